"""Checkpoints: written atomically, read without running code, verified before use.

A run's ``checkpoint.pt`` carries a format version, a checksum of its content (:func:`digest`) and
a fingerprint of the data it was trained on (:func:`data_fingerprint`); :func:`load_checkpoint`
checks all three before ``--resume`` uses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import L2BError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: no version, checksum or fingerprint (read with a warning)
# what restore() reads; a checkpoint without one of them is malformed
REQUIRED = {"config": dict, "position": dict, "model": dict, "optimizer": dict, "order_gen": torch.Tensor,
            "clean_source": dict, "records": dict, "rng": dict}


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flush + fsync, then rename over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a torn one; an OSError
    (ENOSPC, EACCES...) becomes one L2BError naming ``path``.
    """
    path = Path(path)
    write_atomically(path, lambda fh: torch.save(obj, fh))


def write_atomically(path: Path, write) -> None:
    """``write(fh)`` into a temporary file next to ``path``, fsync, rename over ``path``; see :func:`atomic_save`."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise L2BError(f"cannot write {path} ({exc.strerror or exc}); the previous {path.name}, if there was "
                           "one, is intact") from None
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
    except Exception as exc:  # noqa: BLE001 (arbitrary bytes reach the unpickler's every error: IndexError, KeyError, ...)
        raise L2BError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def digest(obj) -> str:
    """sha256 of a checkpoint's content: keys, tensors (dtype, shape, bytes) and plain values, in order."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"V{type(o).__name__}:{o!r}".encode())

    walk(obj)
    return h.hexdigest()


def save_checkpoint(payload: dict, path: Path, fingerprint: str) -> None:
    """A run checkpoint: ``payload`` plus its format version, data fingerprint and checksum, atomically."""
    body = {**payload, "format_version": FORMAT_VERSION, "fingerprint": fingerprint}
    atomic_save({**body, "checksum": digest(body)}, path)


def load_checkpoint(path: Path, *, fingerprint_check: bool = True) -> dict:
    """Read a run checkpoint and verify it: format version, checksum and structure (one L2BError each).

    With ``fingerprint_check`` False (``--resume-anyway``) a checksum mismatch is a warning instead.
    """
    path = Path(path)
    saved = safe_load(path)
    if not isinstance(saved, dict):
        raise L2BError(f"{path}: not an l2b checkpoint (it holds a {type(saved).__name__})")
    version = saved.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise L2BError(f"{path}: checkpoint format {version!r} is newer than this l2b reads ({FORMAT_VERSION}); "
                       "upgrade l2b")
    if version >= 2:
        body = {k: v for k, v in saved.items() if k != "checksum"}
        if saved.get("checksum") != digest(body):
            msg = (f"{path}: checksum mismatch: the checkpoint was altered or corrupted after it was written")
            if fingerprint_check:
                raise L2BError(msg + "; pass --resume-anyway to use it all the same")
            log.warning("%s (used anyway: --resume-anyway)", msg)
    else:
        log.warning("%s: an old checkpoint without checksum or data fingerprint: not verified", path)
    for key, kind in REQUIRED.items():
        if not isinstance(saved.get(key), kind):
            got = "missing" if key not in saved else type(saved[key]).__name__
            raise L2BError(f"{path}: malformed checkpoint: {key!r} should be a {kind.__name__}, got {got}")
    ranks = saved.get("ranks")
    if ranks is not None and not (isinstance(ranks, list) and ranks and
                                  all(isinstance(r, dict) and {"rng", "aug_gen"} <= set(r) for r in ranks)):
        raise L2BError(f"{path}: malformed checkpoint: 'ranks' should be a list of per-process random states")
    return saved


def data_fingerprint(arrays) -> str:
    """sha256 over the training data as the run sees it: images (or their files), observed labels and the
    clean set (tensors, arrays, lists of paths)."""
    return digest([torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in arrays])


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
