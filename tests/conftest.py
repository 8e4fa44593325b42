import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from l2b.data.benchmarks import DEBIAN_FASHION_MNIST, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the gzip-compressed IDX format of (Fashion-)MNIST."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A small Fashion-MNIST in its real on-disk format: 800 train and 300 test images.

    Real images when Debian's package is installed (so models can learn), else random ones.
    """
    folder = tmp_path_factory.mktemp("fmnist")
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        xtr = read_idx(DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz")[:800]
        ytr = read_idx(DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz")[:800]
        xte = read_idx(DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[:300]
        yte = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")[:300]
    else:
        rng = np.random.default_rng(0)
        xtr, xte = rng.integers(0, 256, (800, 28, 28)), rng.integers(0, 256, (300, 28, 28))
        ytr, yte = np.arange(800) % 10, np.arange(300) % 10
    write_idx(folder / "train-images-idx3-ubyte.gz", xtr)
    write_idx(folder / "train-labels-idx1-ubyte.gz", ytr)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", xte)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", yte)
    return folder


@pytest.fixture
def tiny_args(tiny_fmnist):
    """Command-line options of a training run that takes seconds."""
    return ["--data-dir", str(tiny_fmnist), "--subset", "300", "--val-size", "100", "--batch-size", "32",
            "--val-batch-size", "20", "--epochs", "3", "--warmup-epochs", "1", "--eval-batch-size", "300", "--quiet"]
