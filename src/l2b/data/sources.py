"""Loading a data set by name: the registry (``l2b.registry.DATASETS``), the user formats
(``npz:PATH``, ``folder:PATH``, ``csv:PATH``), and what every loaded data set must satisfy.

:func:`load_dataset` checks lengths, label ranges, a clean set with every class and one image shape,
so a bad file fails before training with one line naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import L2BError, check_choice
from ..registry import DATA_FORMATS, DATASETS
from .arrays import ImageData
from .user import int_labels, read_inputs, to_nchw

__all__ = ["register_dataset", "load_dataset", "check_data", "check_labels", "is_user_data"]


def register_dataset(name: str, **preset):
    """Decorator: make ``loader(cfg) -> ImageData`` available as ``--dataset NAME``.

    Keyword arguments are the data set's preset: config values it brings as defaults (docs/EXTENDING.md).
    """
    return DATASETS.register(name, **preset)


def load_dataset(cfg) -> ImageData:
    """Load ``cfg.dataset`` (a registered name or ``npz:PATH``, ``folder:PATH``, ``csv:PATH``) and check it."""
    kind, _, rest = cfg.dataset.partition(":")
    if rest and kind in DATA_FORMATS:
        data = DATA_FORMATS.get(kind)(Path(rest), cfg)
        source = rest
    else:
        check_choice("dataset", cfg.dataset, DATASETS.names() + [k + ":PATH" for k in DATA_FORMATS.names()])
        data = DATASETS.get(cfg.dataset)(cfg)
        source = cfg.dataset
    if cfg.trusted:
        add_trusted(data, cfg)
    check_data(data, source)
    if not data.train_labels_known and data.x_val is None:
        raise L2BError(f"{source}: the training labels are not known to be clean, so no clean set can be carved "
                       "from them; the data must bring its own clean (val) split")
    return data


def is_user_data(dataset: str) -> bool:
    """True for ``KIND:PATH`` of a user format: labels as the user observed them, not known to be the truth."""
    kind, sep, rest = dataset.partition(":")
    return bool(sep and rest) and kind in DATA_FORMATS


def add_trusted(data: ImageData, cfg) -> None:
    """``--trusted KIND:PATH``: the user's trusted set becomes the data's clean (val) split, in place."""
    if data.x_val is not None:
        raise L2BError(f"--trusted {cfg.trusted}: {cfg.dataset} already brings a trusted (val) split; "
                       "give one or the other")
    arrays = read_inputs(cfg.trusted, data.classes, cfg.image_size, split="val")  # a training layout: its val
    if arrays.y is None:
        raise L2BError(f"--trusted {cfg.trusted}: no labels found (npz: arrays x and y; folder: one sub-folder "
                       "per class, named as the training classes; csv: rows path,label)")
    data.x_val = to_nchw(np.asarray(arrays.x), f"--trusted {cfg.trusted}")
    data.y_val = int_labels(arrays.y, f"--trusted {cfg.trusted}")


def check_data(data: ImageData, source: str) -> None:
    """What every data set must satisfy; each failure names ``source`` and the problem."""
    k = data.num_classes
    if k < 2:
        raise L2BError(f"{source}: found {k} class(es); a classifier needs at least 2")
    shape = None
    for split, x, y in (("train", data.x_train, data.y_train), ("val", data.x_val, data.y_val),
                        ("test", data.x_test, data.y_test)):
        if x is None and y is None:
            continue
        if x is None or y is None or len(x) != len(y):
            raise L2BError(f"{source}: {split} has {0 if x is None else len(x)} images but "
                           f"{0 if y is None else len(y)} labels")
        if len(y) == 0:
            raise L2BError(f"{source}: the {split} split is empty")
        if x.dtype != np.uint8 or x.ndim != 4:
            raise L2BError(f"{source}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if shape is not None and x.shape[1:] != shape:
            raise L2BError(f"{source}: {split} images are {x.shape[1:]}, train images {shape} (C, H, W); "
                           "pass --image-size N to resize them all")
        shape = x.shape[1:]
        check_labels(y, k, f"{source}: {split} labels")
    if data.noisy_train is not None:
        if len(data.noisy_train) != len(data.y_train):
            raise L2BError(f"{source}: {len(data.noisy_train)} noisy labels for {len(data.y_train)} training images")
        check_labels(data.noisy_train, k, f"{source}: noisy train labels")
    if data.y_val is not None:
        missing = np.setdiff1d(np.arange(k), data.y_val)
        if missing.size:
            c = int(missing[0])
            raise L2BError(f"{source}: class {c} ({data.classes[c]!r}) has no image in the clean (val) set; "
                           "every class needs clean images")
    if len(data.y_test) == 0:
        raise L2BError(f"{source}: the test split is empty")


def check_labels(y: np.ndarray, k: int, what: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= k):
        i = int(np.flatnonzero((y < 0) | (y >= k))[0])
        raise L2BError(f"{what}: label {int(y[i])} at entry {i} is out of range; classes are 0..{k - 1}")
