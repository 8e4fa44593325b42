"""Image files: decoding with Pillow (an optional dependency), and files standing in for an array.

Files are decoded once, at a fixed size, by a thread pool (``decode_images``), or with ``--stream``
per batch by DataLoader workers (:class:`ImageFiles`, read by ``l2b.data.arrays.StreamingImages``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import L2BError

__all__ = ["IMAGE_SUFFIXES", "pil", "decode_one", "decode_images", "ImageFiles", "load_images", "inside"]


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def pil():
    try:
        from PIL import Image
    except ImportError:
        raise L2BError("reading image files needs Pillow, which is not installed: pip install Pillow") from None
    return Image


def decode_one(Image, path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("L", "1", "P") and not _has_colour(img) else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise L2BError(f"image file {path} not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise L2BError(f"{path}: corrupt or unreadable image ({exc})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def _has_colour(img) -> bool:
    if img.mode != "P":
        return False
    pal = img.getpalette() or []
    return any(not (pal[i] == pal[i + 1] == pal[i + 2]) for i in range(0, len(pal) - 2, 3))


def decode_images(paths: list[Path], size: int | None) -> np.ndarray:
    """Decode image files into uint8 (N, C, H, W): grey if every file is grey, else RGB; resized to
    ``size`` x ``size`` when given, else all files must have one size."""
    Image = pil()
    if not paths:
        return np.zeros((0, 1, size or 1, size or 1), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL
        arrays = list(pool.map(lambda p: decode_one(Image, p, size), paths))
    first = arrays[0].shape[1:]
    for p, a in zip(paths, arrays):
        if a.shape[1:] != first:
            raise L2BError(f"mixed image sizes: {paths[0]} is {first[1]}x{first[0]}, {p} is "
                           f"{a.shape[2]}x{a.shape[1]} (W x H); pass --image-size N to resize all to N x N")
    channels = max(a.shape[0] for a in arrays)
    out = np.empty((len(arrays), channels, *first), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a  # a grey image broadcasts to the three channels
    return out


class ImageFiles:
    """Image files standing in for a uint8 array (N, C, size, size) that is never held in memory (``--stream``).

    It has what the split and noise code reads from an array: ``len``, ``shape``, ``dtype``, ``ndim``,
    indexing by an index array (another ImageFiles) and ``astype`` (decodes every file). ``decode(i)``
    gives one image (C, size, size) exactly as the in-memory loader would (a grey file in a colour set
    is repeated over the three channels).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: list, size: int, channels: int):
        self.paths, self.size, self.channels = list(paths), size, channels

    @classmethod
    def probe(cls, paths: list, size: int, sample: int = 1000, seed: int = 0) -> ImageFiles:
        """The channel count from a seeded sample of up to ``sample`` files: 3 if any is in colour, else 1."""
        pick = np.sort(np.random.default_rng(seed).choice(len(paths), min(sample, len(paths)), replace=False))
        channels = max((cls(paths, size, 3)._decode(int(i)).shape[0] for i in pick), default=1)
        return cls(paths, size, channels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx) -> ImageFiles:
        return ImageFiles([self.paths[int(i)] for i in np.asarray(idx).reshape(-1)], self.size, self.channels)

    def concat(self, other: ImageFiles) -> ImageFiles:
        assert (self.size, self.channels) == (other.size, other.channels)
        return ImageFiles(self.paths + other.paths, self.size, self.channels)

    def _decode(self, i: int) -> np.ndarray:
        return decode_one(pil(), self.paths[i], self.size)

    def decode(self, i: int) -> np.ndarray:
        a = self._decode(i)  # (C, H, W) uint8
        if a.shape[0] > self.channels:
            raise L2BError(f"{self.paths[i]} is in colour, the sampled images of its split were grey; "
                           "convert the images to one mode, or load without --stream")
        return np.broadcast_to(a, (self.channels, *a.shape[1:]))

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Up to ``n`` images (seeded, in file order; all of them when there are at most ``n``), uint8 (n, C, H, W)."""
        pick = np.sort(np.random.default_rng(seed).choice(len(self), min(n, len(self)), replace=False))
        return self[pick].astype(np.uint8)

    def astype(self, dtype) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.uint8)
        for i in range(len(self)):
            out[i] = self.decode(i)
        return out.astype(dtype, copy=False)


def load_images(paths: list[Path], size: int | None, cfg) -> np.ndarray | ImageFiles:
    """The images of ``paths``: decoded (uint8 (N, C, H, W)), or with ``cfg.stream`` the files, decoded per batch."""
    if not getattr(cfg, "stream", False):
        return decode_images(paths, size)
    if size is None:
        raise L2BError("--stream decodes images per batch, so they must share one size: pass --image-size N")
    pil()
    return ImageFiles.probe(paths, size, seed=cfg.seed) if paths else ImageFiles([], size, 1)


def inside(root: Path, rel: str, listing: Path) -> Path:
    """``root / rel``, refusing a path that leaves ``root`` (absolute, ``..``, or a link out)."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise L2BError(f"{listing}: path {rel!r} escapes the folder {root}; paths must stay inside it")
    return path
