"""docs/EXTENDING.md's examples run as written: registered from outside the package, trained from the CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "EXTENDING.md").read_text(), flags=re.S)


def _l2b(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT / "src")])}
    return subprocess.run([sys.executable, "-m", "l2b", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_method_registered_outside_the_package_trains_from_the_cli(tmp_path, tiny_args):
    (tmp_path / "my_methods.py").write_text(_blocks()[0])
    done = _l2b(tmp_path, "--plugin", "my_methods", "train", "--method", "small-loss", "--out", "run", *tiny_args)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "small-loss" and summary["test_acc_last"] > 20.0  # it learned (10 classes)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # without the plugin the name is unknown, and the error says so in one line
    missing = _l2b(tmp_path, "train", "--method", "small-loss", "--out", "run2", *tiny_args)
    assert missing.returncode == 2 and "unknown method 'small-loss'" in missing.stderr
    assert not (tmp_path / "run2").exists()


def test_a_data_set_and_model_registered_outside_train_with_the_preset(tmp_path):
    rng = np.random.default_rng(0)
    x = lambda n: rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)  # noqa: E731
    y = lambda n: np.arange(n) % 2  # noqa: E731
    np.savez(tmp_path / "scans.npz", x_train=x(64), y_train=y(64), x_val=x(16), y_val=y(16), x_test=x(20),
             y_test=y(20))
    (tmp_path / "my_data.py").write_text(_blocks()[1])
    done = _l2b(tmp_path, "--plugin", "my_data", "train", "--dataset", "my-scans", "--model", "tiny-mlp",
                "--epochs", "2", "--batch-size", "16", "--val-batch-size", "8", "--out", "run", "--quiet")
    assert done.returncode == 0, done.stderr
    noise = json.loads((tmp_path / "run" / "noise.json").read_text())
    assert noise["num_train"] == 64 and noise["num_clean"] == 16  # the preset: all images, the data's own clean set
    assert noise["noise_rate_actual"] == 0.0  # the preset's noise "none": the labels as given
