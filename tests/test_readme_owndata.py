"""README's "Your own data" commands run as written, on tiny generated data in each format.

Only the training budget is shortened (flags appended after the README's own, so they win): a few
dozen 8x8 images, one epoch.
"""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from l2b import cli
from helpers import bands

Image = pytest.importorskip("PIL.Image")
README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = ["cat", "dog", "owl"]
SHORT = ["--epochs", "1", "--batch-size", "16", "--val-batch-size", "9", "--device", "cpu"]


def section_commands() -> list[list[str]]:
    """The bash blocks of the README's "Your own data" section, one list of command lines per block."""
    text = README.read_text()
    section = text[text.index("## Your own data"):]
    section = section[: section.index("\n## ", 1)]
    return [[line for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def pngs(root: Path, x, y, *, by_class=True) -> list[Path]:
    files = []
    for i in range(len(y)):
        path = root / CLASSES[y[i]] / f"{i:02d}.png" if by_class else root / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(path)
        files.append(path)
    return files


def make_inputs(here: Path) -> None:
    """mydata.npz, new.npz; mydata/ (train, val, test), new_images/; mydata.csv, trusted.csv, new.csv."""
    (x, y), (xv, yv), (xt, yt), (xn, _) = bands(48, 0), bands(18, 1), bands(12, 2), bands(5, 3)
    np.savez(here / "mydata.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, x_val=xv, y_val=yv,
             classes=np.array(CLASSES))
    np.savez(here / "new.npz", x=xn)
    for split, (xs, ys) in {"train": (x, y), "val": (xv, yv), "test": (xt, yt)}.items():
        pngs(here / "mydata" / split, xs, ys)
    pngs(here / "new_images", xn, np.zeros(len(xn), int), by_class=False)
    images = here / "images"
    train, test = pngs(images / "train", x, y), pngs(images / "test", xt, yt)
    rows = [f"{p.relative_to(here)},{CLASSES[c]},train" for p, c in zip(train, y)]
    rows += [f"{p.relative_to(here)},{CLASSES[c]},test" for p, c in zip(test, yt)]
    (here / "mydata.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    trusted = pngs(images / "val", xv, yv)
    (here / "trusted.csv").write_text("".join(f"{p.relative_to(here)},{CLASSES[c]}\n" for p, c in zip(trusted, yv)))
    (here / "new.csv").write_text("".join(f"{p.relative_to(here)}\n" for p in pngs(images / "new", xn, yv[:5],
                                                                                  by_class=False)))


def test_the_section_covers_every_format_and_command():
    blocks = section_commands()
    assert len(blocks) == 3
    for block, kind in zip(blocks, ("npz:", "folder:", "csv:")):
        assert [shlex.split(line)[1] for line in block] == ["train", "labels", "eval", "predict"]
        assert f"--dataset {kind}" in block[0]


@pytest.mark.parametrize("block", range(3), ids=["npz", "folder", "csv"])
def test_readme_own_data_commands_run_as_written(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_inputs(tmp_path)
    lines = section_commands()[block]
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "l2b"
        extra = SHORT if argv[1] == "train" else []
        assert cli.main(argv[1:] + extra) == 0, (line, capsys.readouterr().err)
    run = tmp_path / shlex.split(lines[0])[shlex.split(lines[0]).index("--out") + 1]
    out = capsys.readouterr().out
    assert "l2b plan:" in out and "no synthetic noise" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["num_samples"] == 12 and report["classes"] == CLASSES  # the test split only
    assert (run / "predictions.csv").is_file() and (run / "label_issues.csv").is_file()
    assert json.loads((run / "summary.json").read_text())["noise_rate"] is None
