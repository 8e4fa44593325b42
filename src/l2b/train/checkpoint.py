"""Checkpoints: written atomically, read without running code."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import L2BError


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flush + fsync, then rename over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def safe_load(path: Path, map_location="cpu"):
    """torch.load with weights_only=True: tensors, numbers, strings and containers only.

    A file that would run code on load (a crafted pickle) is refused with an L2BError.
    """
    path = Path(path)
    if not path.is_file():
        raise L2BError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns before refusing; our one error line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise L2BError(f"{path}: refused to load: it holds objects other than tensors and plain data ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise L2BError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def rng_state() -> dict:
    """Every global random-number state: python, numpy, torch CPU and each CUDA device."""
    state = {
        "python": _python_state_to_list(random.getstate()),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_python_state_from_list(state["python"]))
    np.random.set_state(numpy_state_restore(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# weights_only loading admits lists/tuples/ints/strings: store states in those shapes
def _python_state_to_list(s):
    return [s[0], list(s[1]), s[2]]


def _python_state_from_list(s):
    return (s[0], tuple(s[1]), s[2])


def _numpy_state(s):
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4])]


def numpy_state_restore(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])
