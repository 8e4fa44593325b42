"""Data sets in memory, the clean/noisy split, and batches made on the training device.

A data set is an :class:`ImageData` of uint8 arrays (N, C, H, W). The trainer moves it to the
device once; a batch is an index gather, a float conversion and (optionally) augmentation, all on
the device: no per-image Python loop. With ``--stream`` the images are files
(:class:`l2b.data.images.ImageFiles`) decoded per batch by DataLoader workers (:class:`StreamingImages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import L2BError
from .images import ImageFiles

__all__ = ["ImageData", "DeviceImages", "StreamingImages", "device_images", "concat_images", "channel_stats",
           "balanced_clean_split", "balanced_order", "random_crop_flip"]


@dataclass
class ImageData:
    """A labelled image data set held in memory.

    Attributes
    ----------
    name : str
    classes : list of str, length K
    x_train, x_test : np.ndarray, shape (N, C, H, W), uint8
        Or, with ``--stream``, :class:`ImageFiles`: the files, decoded per batch.
    y_train, y_test : np.ndarray, shape (N,), int64
        True labels. Where the truth is unknown (real-world noise), y_train holds the given labels
        and ``noisy_train`` is set as well.
    x_val, y_val : np.ndarray or None
        A given clean set; None means it is carved out of the training set.
    noisy_train : np.ndarray or None, shape (N,)
        Observed labels supplied with the data (real-world noise); None means synthesise noise.
    train_labels_known : bool
        False when y_train is not the truth (then rates and flip statistics are "unknown").
    coarse : np.ndarray or None, shape (K,)
        Superclass of each class (CIFAR-100), used by asymmetric noise.
    paths : list of str or None
        Source file of each training image, where there is one.
    files : dict of str to str
        Text files to save in the run folder (e.g. the seeded ISIC2019 split, ``split.csv``).
    """

    name: str
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    noisy_train: np.ndarray | None = None
    train_labels_known: bool = True
    coarse: np.ndarray | None = None
    paths: list[str] | None = field(default=None, repr=False)
    files: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def balanced_clean_split(labels: np.ndarray, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-balanced clean set of ``size`` samples (remainder spread over the first classes)."""
    per_class = np.full(num_classes, size // num_classes)
    per_class[: size % num_classes] += 1
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class[c]:
            raise L2BError(
                f"clean set of {size} needs {per_class[c]} images of class {c}, the data has {len(members)}; "
                "lower --val-size"
            )
        picked.append(rng.choice(members, size=per_class[c], replace=False))
    return np.sort(np.concatenate(picked))


def _normalise(x: Tensor, scale: bool, mean: Tensor, std: Tensor, *, augment: bool, pad: int, flip: bool,
               generator: torch.Generator | None, dtype) -> Tensor:
    """The float batch (B, C, H, W) the model sees: [0, 1] scale (if ``scale``), augmentation, normalisation."""
    x = x.to(dtype)
    if scale:
        x.div_(255.0)
    if augment:
        x = random_crop_flip(x, pad, flip, generator)
    return (x - mean.to(dtype)) / std.to(dtype)


class DeviceImages:
    """uint8 images on the training device, turned into normalised float batches on demand.

    ``augment`` applies, on the device, a random crop after zero padding (``pad`` pixels) and, if
    ``flip``, a random horizontal flip, each drawn per image from ``generator``.
    """

    def __init__(self, x: np.ndarray, device: torch.device, mean: Tensor, std: Tensor):
        self.x = torch.as_tensor(np.ascontiguousarray(x)).to(device)
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: Tensor, *, augment: bool = False, pad: int = 2, flip: bool = True,
              generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
        # float inputs (feature vectors as (N, D, 1, 1)) are used as given
        return _normalise(self.x[idx], self.x.dtype == torch.uint8, self.mean, self.std, augment=augment, pad=pad,
                          flip=flip, generator=generator, dtype=dtype)


def concat_images(a, b):
    """Two image sets (arrays or ImageFiles) as one, in order."""
    return a.concat(b) if isinstance(a, ImageFiles) else np.concatenate([a, b])


class _FileDataset(torch.utils.data.Dataset):
    """Decoded image ``i`` of an ImageFiles as a uint8 tensor (C, H, W); a user error comes back as its message."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return torch.from_numpy(np.ascontiguousarray(self.files.decode(i)))
        except L2BError as exc:  # raised again in the training process as one line, not a worker traceback
            return str(exc)


class _OneRequest(torch.utils.data.Sampler):
    """Batch sampler that yields the chunks of the batch asked for last (one DataLoader pass per batch)."""

    def __init__(self):
        self.chunks: list[list[int]] = []

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class StreamingImages:
    """Image files decoded per batch by a DataLoader with ``workers`` processes (Pillow), then made into
    the same normalised float batches as :class:`DeviceImages` (same augmentation code, same interface).

    The workers are persistent; each batch is split into one chunk per worker, and the chunks come back
    in order, so a batch is the same for any number of workers. No randomness is drawn here.
    """

    def __init__(self, files: ImageFiles, device: torch.device, mean: Tensor, std: Tensor, *, workers: int = 4):
        self.files, self._device, self.workers = files, torch.device(device), workers
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)
        self._request = _OneRequest()
        self._loader = torch.utils.data.DataLoader(
            _FileDataset(files), batch_sampler=self._request, num_workers=workers, collate_fn=list,
            persistent_workers=workers > 0)

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, idx: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) of the indices ``idx`` (B,), on the CPU."""
        ids = idx.cpu().tolist()
        per = -(-len(ids) // max(self.workers, 1))
        self._request.chunks = [ids[s : s + per] for s in range(0, len(ids), per)]
        images = [im for chunk in self._loader for im in chunk]
        for im in images:
            if isinstance(im, str):
                raise L2BError(im)
        return torch.stack(images) if images else torch.zeros((0, *self.files.shape[1:]), dtype=torch.uint8)

    def batch(self, idx: Tensor, *, augment: bool = False, pad: int = 2, flip: bool = True,
              generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
        return _normalise(self.decode(idx).to(self._device), True, self.mean, self.std, augment=augment, pad=pad,
                          flip=flip, generator=generator, dtype=dtype)


def device_images(x, device: torch.device, mean: Tensor, std: Tensor, *, workers: int = 4):
    """DeviceImages for an array, StreamingImages for ImageFiles."""
    if isinstance(x, ImageFiles):
        return StreamingImages(x, device, mean, std, workers=workers)
    return DeviceImages(x, device, mean, std)


def channel_stats(x: np.ndarray, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of images (N, C, H, W): uint8 on the [0, 1] scale, floats as given.

    Over the first 10,000 images of an array; over a seeded sample of up to 1,000 of ImageFiles.
    """
    if isinstance(x, ImageFiles):
        x = x.sample(1000, seed)
    xs = torch.as_tensor(x[: min(len(x), 10000)]).double()
    if x.dtype == np.uint8:
        xs.div_(255.0)
    mean = xs.mean(dim=(0, 2, 3))
    std = xs.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.float(), std.float()


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> Tensor:
    """Per-image random crop of a zero-padded batch (B, C, H, W) and optional horizontal flip."""
    b, _, h, w = x.shape
    gen_device = generator.device if generator is not None else x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gen_device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (B, H)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (B, W)
        x = padded[torch.arange(b, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = torch.rand(b, generator=generator, device=gen_device).to(x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def balanced_order(labels: Tensor, num_batches: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Sample indices for an epoch of ``num_batches`` class-balanced batches (Clothing1M's 250 per epoch).

    Each batch holds batch_size // K samples of every class present (the remainder goes to random
    classes); within a class, samples are drawn without replacement, starting a new pass when one runs
    out. Returns (num_batches * batch_size,) indices; batch b is the slice [b * batch_size, (b + 1) * batch_size).
    """
    present = torch.unique(labels)
    k = len(present)
    per = torch.full((num_batches, k), batch_size // k, dtype=torch.int64)
    extra = batch_size - per[0].sum().item()
    if extra:
        per[torch.arange(num_batches)[:, None], torch.rand(num_batches, k, generator=generator).argsort(1)[:, :extra]] += 1
    columns = []
    for j, c in enumerate(present):
        members = torch.nonzero(labels == c)[:, 0]
        need = int(per[:, j].sum())
        passes = -(-need // len(members))
        draw = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(passes)])[:need]
        columns.append(draw)
    out, pos = [], [0] * k
    for b in range(num_batches):
        parts = []
        for j in range(k):
            n = int(per[b, j])
            parts.append(columns[j][pos[j] : pos[j] + n])
            pos[j] += n
        batch = torch.cat(parts)
        out.append(batch[torch.randperm(len(batch), generator=generator)])
    return torch.cat(out)
