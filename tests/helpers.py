"""What several test files share: small generated images, and comparing the models of two run folders.

Importable as ``helpers`` (the tests folder is on sys.path: it holds the root conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from l2b.train.checkpoint import safe_load


def bands(n: int, seed: int):
    """(N, 8, 8) uint8 images of 3 classes (a bright band at a class-specific height), labels (N,)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 8, 8))
    for c in range(3):
        x[y == c, 2 * c : 2 * c + 3, :] += 150
    return x.astype(np.uint8), y


def same_model(a: Path, b: Path) -> list[str]:
    """The parameter names whose tensors differ between two run folders' checkpoint.pt (bit for bit)."""
    pa, pb = safe_load(Path(a) / "checkpoint.pt")["model"], safe_load(Path(b) / "checkpoint.pt")["model"]
    if pa.keys() != pb.keys():
        return sorted(set(pa) ^ set(pb))
    return [k for k in pa if not torch.equal(pa[k], pb[k])]


def wait_for(path: Path, proc, timeout: float = 240, poll: float = 0.05) -> None:
    """Until ``path`` exists; fails if the process ``proc`` ends first or ``timeout`` seconds pass."""
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(poll)
