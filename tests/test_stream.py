"""--stream: image files decoded per batch by DataLoader workers give what the in-memory path gives."""

import numpy as np
import pytest
import torch

from l2b.train.checkpoint import safe_load
from l2b import make_config
from l2b.data.arrays import DeviceImages, StreamingImages
from l2b.data.images import ImageFiles
from l2b.data import load_dataset
from l2b import L2BError
from l2b.data import prepare_data
from l2b.cli import main

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def _no_user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("L2B_DATA", raising=False)


def _folder(tmp_path, n_train=6):
    """Two classes of PNGs of mixed sizes, one grey PNG among colour ones, and one JPEG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split, n in (("train", n_train), ("val", 2), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (9 + i % 3, 7 + i % 2) + (() if (split, c, i) == ("train", "dog", 1) else (3,))
                img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
                img.save(root / split / c / (f"{i}.jpg" if (split, c, i) == ("train", "cat", 2) else f"{i}.png"))
    return root


def _both(root, **kw):
    base = dict(dataset=f"folder:{root}", image_size=8, subset=0, val_size=4, **kw)
    cfg_mem, cfg_stream = make_config(base), make_config({**base, "stream": True})
    mem = prepare_data(cfg_mem, load_dataset(cfg_mem), torch.device("cpu"), trains_on_clean=False)
    stream = prepare_data(cfg_stream, load_dataset(cfg_stream), torch.device("cpu"), trains_on_clean=False)
    return mem, stream


def test_streamed_batches_equal_the_in_memory_ones(tmp_path):
    mem, stream = _both(_folder(tmp_path), workers=0)
    assert isinstance(mem.train, DeviceImages) and isinstance(stream.train, StreamingImages)
    assert torch.equal(mem.mean, stream.mean) and torch.equal(mem.std, stream.std)
    idx = torch.tensor([5, 0, 11, 3, 3, 8])
    for split in ("train", "clean", "test"):
        a, b = getattr(mem, split), getattr(stream, split)
        assert len(a) == len(b)
        i = idx[idx < len(a)]
        assert torch.equal(a.batch(i), b.batch(i)), split  # PNG and JPEG decode identically both ways
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(mem.train.batch(idx, augment=True, generator=g1), stream.train.batch(idx, augment=True, generator=g2))


def test_workers_give_the_same_batches_and_one_line_errors(tmp_path):
    root = _folder(tmp_path)
    files = load_dataset(make_config(dict(dataset=f"folder:{root}", image_size=8, stream=True))).x_train
    assert isinstance(files, ImageFiles) and files.shape == (12, 3, 8, 8)
    mean, std = torch.zeros(3), torch.ones(3)
    s0 = StreamingImages(files, torch.device("cpu"), mean, std, workers=0)
    s2 = StreamingImages(files, torch.device("cpu"), mean, std, workers=2)
    for idx in (torch.tensor([7, 1, 1, 10, 0]), torch.arange(12), torch.tensor([4])):
        assert torch.equal(s0.batch(idx), s2.batch(idx))
    (root / "train" / "cat" / "0.png").write_bytes(b"not an image")
    with pytest.raises(L2BError, match=r"0\.png: corrupt or unreadable image") as info:
        s2.batch(torch.tensor([3, 0]))
    assert "\n" not in str(info.value)


def _model(run):
    return safe_load(run / "checkpoint.pt")["model"]


def test_streamed_training_equals_in_memory_training(tmp_path):
    root = _folder(tmp_path, n_train=10)
    args = ["train", "--dataset", f"folder:{root}", "--image-size", "8", "--subset", "0", "--val-size", "4",
            "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8", "--val-batch-size", "4", "--augment",
            "--noise", "sym", "--noise-rate", "0.2"]
    assert main([*args, "--out", str(tmp_path / "mem")]) == 0
    assert main([*args, "--stream", "--workers", "0", "--out", str(tmp_path / "stream")]) == 0
    assert (tmp_path / "stream" / "summary.json").is_file()
    a, b = _model(tmp_path / "mem"), _model(tmp_path / "stream")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_needs_image_size(tmp_path, capsys):
    root = _folder(tmp_path)
    assert main(["train", "--dataset", f"folder:{root}", "--stream", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l2b: error:") and "--image-size" in err and "\n" not in err
