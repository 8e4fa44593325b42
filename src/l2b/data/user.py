"""Your own data: ``npz:PATH``, ``folder:PATH`` and ``csv:PATH``, for training (:data:`PATH_KINDS`)
and for prediction and evaluation (:func:`read_inputs`).
"""

from __future__ import annotations

import csv
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import L2BError, check_choice
from ..registry import DATA_FORMATS
from .arrays import ImageData
from .images import IMAGE_SUFFIXES, decode_images, inside, load_images

log = logging.getLogger(__name__)

__all__ = ["PATH_KINDS", "load_npz", "load_folder", "load_csv", "read_listing", "Arrays", "read_inputs"]


def to_nchw(x: np.ndarray, name: str) -> np.ndarray:
    """Images N x H x W, N x H x W x C or N x C x H x W -> uint8 (N, C, H, W), by one explicit rule.

    - ``uint8``: kept as they are.
    - any other integer type: values must lie in [0, 255]; cast exactly (nothing is rescaled or clipped).
    - ``float``: values must be finite and lie in [0, 1]; scaled by 255 and rounded to the nearest integer.
    - anything else (bool, complex, strings, objects), integers outside [0, 255], floats outside [0, 1]
      (e.g. 0-255 floats, or normalised images with negative values) is refused: convert it to uint8
      yourself, so that no guess about its scale is made here.

    A conversion is logged (one warning naming the array), never silent.
    """
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise L2BError(f"{name}: images must be N x H x W, N x H x W x C or N x C x H x W, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    is_int = np.issubdtype(x.dtype, np.integer) and x.dtype != np.bool_
    if not (is_int or np.issubdtype(x.dtype, np.floating)):
        raise L2BError(f"{name}: images must be uint8, integers in [0, 255] or floats in [0, 1], got {x.dtype}")
    if x.size == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    if is_int:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise L2BError(f"{name}: {x.dtype} images must lie in [0, 255], found [{lo}, {hi}]; "
                           "rescale them to uint8 yourself")
        log.warning("%s: %s images in [0, 255] cast to uint8 exactly", name, x.dtype)
        return np.ascontiguousarray(x.astype(np.uint8))
    if not np.isfinite(x).all():
        raise L2BError(f"{name}: images contain NaN or infinity")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise L2BError(f"{name}: float images must lie in [0, 1], found [{lo:g}, {hi:g}]; 0-255 floats or "
                       "normalised images are ambiguous: convert them to uint8 yourself")
    log.warning("%s: %s images in [0, 1] converted to uint8 as round(255 x)", name, x.dtype)
    return np.ascontiguousarray(np.rint(x.astype(np.float64) * 255.0).astype(np.uint8))


def int_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise L2BError(f"{name}: labels must be 1-D, got shape {y.shape}")
    integral = np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_
    if not (integral or (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
        raise L2BError(f"{name}: labels must be integers (class indices), got {y.dtype}"
                       + (" with non-integral or non-finite values" if np.issubdtype(y.dtype, np.floating) else ""))
    if y.size and np.issubdtype(y.dtype, np.unsignedinteger) and int(y.max()) > np.iinfo(np.int64).max:
        raise L2BError(f"{name}: label {int(y.max())} is out of range")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise L2BError(f"{name}: negative label {int(y.min())}; labels are class indices 0..K-1")
    return y


def load_npz(path: Path, cfg) -> ImageData:
    """``npz:PATH``: arrays x_train, y_train, x_test, y_test, optional x_val, y_val and classes."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise L2BError(f"npz file {path} not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError) as exc:
        raise L2BError(f"{path}: not a readable .npz file ({_first_line(exc)}); is it truncated or overwritten?") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise L2BError(f"{path}: missing array(s) {', '.join(missing)} (found {', '.join(sorted(arrays)) or 'none'})")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise L2BError(f"{path}: give both x_val and y_val, or neither")
    splits = {}
    for s in ("train", "val", "test"):
        if f"x_{s}" not in arrays:
            continue
        x = to_nchw(arrays[f"x_{s}"], f"{path}: x_{s}")
        y = int_labels(arrays[f"y_{s}"], f"{path}: y_{s}")
        if len(x) != len(y):
            raise L2BError(f"{path}: x_{s} has {len(x)} images but y_{s} has {len(y)} labels")
        splits[s] = (x, y)
    for s in splits:
        if len(splits[s][1]) == 0:
            raise L2BError(f"{path}: x_{s} and y_{s} are empty; every split needs images (drop x_val/y_val to "
                           "carve the clean set from the training split)")
    k = int(max(y.max() for _, y in splits.values())) + 1
    if "classes" in arrays:
        if arrays["classes"].ndim != 1:
            raise L2BError(f"{path}: 'classes' must be a 1-D array of names, got shape {arrays['classes'].shape}")
        classes = [str(c) for c in arrays["classes"]]
        if len(classes) < k:
            raise L2BError(f"{path}: label {k - 1} is out of range for the {len(classes)} names in 'classes'")
        if len(set(classes)) != len(classes):
            raise L2BError(f"{path}: 'classes' names a class twice")
    else:  # the classes are 0..max label: each must have training and test images, or a label is a typo
        classes = [str(c) for c in range(k)]
        for s in ("train", "test"):
            absent = np.setdiff1d(np.arange(k), splits[s][1])
            if absent.size:
                c = int(absent[0])
                counts = ", ".join(f"{n} in y_{t}" for t, (_, y) in splits.items() if (n := int((y == c).sum())))
                raise L2BError(f"{path}: label {c} has no image in y_{s} ({counts or 'none anywhere'}); the labels "
                               f"0..{k - 1} are taken as the classes, so a stray label makes a class that does not "
                               "exist: fix it, or name every class in an array 'classes'")
    val = splits.get("val", (None, None))
    return ImageData(f"npz:{path}", classes, *splits["train"], *splits["test"], x_val=val[0], y_val=val[1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_folder(root: Path, cfg) -> ImageData:
    """``folder:PATH``: ``train/``, ``test/`` and optional ``val/`` (the clean set), one sub-folder per class."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise L2BError(f"{root}: expected train/ and test/ (and optionally val/) with one sub-folder per class")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise L2BError(f"{root / 'train'}: no class sub-folders")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s in ("train", "val", "test"):
        if not (root / s).is_dir():
            continue
        paths, labels = [], []
        for d in sorted(p for p in (root / s).iterdir() if p.is_dir()):
            if d.name not in index:
                raise L2BError(f"{d}: class {d.name!r} is not among the training classes {classes}")
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [index[d.name]] * len(files)
        splits[s] = (load_images(paths, cfg.image_size, cfg), np.asarray(labels, dtype=np.int64), paths)
    val = splits.get("val", (None, None, None))
    return ImageData(f"folder:{root}", classes, splits["train"][0], splits["train"][1], splits["test"][0],
                     splits["test"][1], x_val=val[0], y_val=val[1], paths=[str(p) for p in splits["train"][2]])


SPLIT_NAMES = {"train": "train", "val": "val", "clean": "val", "valid": "val", "validation": "val", "test": "test"}


def read_listing(path: Path, expected: str) -> list[list[str]]:
    """The non-empty rows of a CSV listing of image files, cells stripped, without a header row."""
    try:
        with open(path, newline="") as fh:
            rows = [[c.strip() for c in r] for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except OSError as exc:
        raise L2BError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise L2BError(f"{path}: not a readable CSV text file ({_first_line(exc)})") from None
    if rows and rows[0][0].lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise L2BError(f"{path}: no rows (expected {expected})")
    return rows


def load_csv(path: Path, cfg) -> ImageData:
    """``csv:PATH``: rows ``path,label[,split]``, paths relative to the CSV's folder; labels are indices or
    names; split is train, val (clean) or test. Without a split column a seeded 20% of rows is the test set."""
    rows = read_listing(path, "path,label[,split]")
    root = path.parent
    files, labels, split = [], [], []
    for i, r in enumerate(rows, 1):
        if len(r) not in (2, 3):
            raise L2BError(f"{path}: row {i} has {len(r)} columns, expected path,label[,split]")
        files.append(inside(root, r[0], path))
        labels.append(r[1])
        if len(r) == 3:
            if r[2].lower() not in SPLIT_NAMES:
                raise L2BError(f"{path}: row {i}: split {r[2]!r} is not train, val or test")
            split.append(SPLIT_NAMES[r[2].lower()])
    if split and len(split) != len(rows):
        raise L2BError(f"{path}: give a split on every row or on none")
    check_listing(files, labels, split, path)
    if all(v.lstrip("-").isdigit() for v in labels):
        y = np.asarray([int(v) for v in labels], dtype=np.int64)
        if y.min() < 0:
            raise L2BError(f"{path}: negative label {int(y.min())} on row {int(np.argmin(y)) + 1}")
        classes = [str(c) for c in range(int(y.max()) + 1)]
    else:
        classes = sorted(set(labels))
        y = np.asarray([classes.index(v) for v in labels], dtype=np.int64)
    split = np.asarray(split) if split else np.where(
        np.random.default_rng(cfg.seed).random(len(rows)) < 0.2, "test", "train")
    x = load_images(files, cfg.image_size, cfg)
    part = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    has_val = part["val"].size > 0
    return ImageData(f"csv:{path}", classes, x[part["train"]], y[part["train"]], x[part["test"]], y[part["test"]],
                     x_val=x[part["val"]] if has_val else None, y_val=y[part["val"]] if has_val else None,
                     paths=[str(files[i]) for i in part["train"]])


def check_listing(files: list[Path], labels: list[str], split: list[str], path: Path) -> None:
    """Each image file at most once: a file listed twice (with two labels, or in two splits: train/test
    leakage, or simply repeated) is refused, naming both rows."""
    first: dict[Path, int] = {}
    for i, f in enumerate(files):
        key = Path(f).resolve()
        j = first.setdefault(key, i)
        if j == i:
            continue
        if labels[i] != labels[j]:
            why = f"with two labels ({labels[j]!r} on row {j + 1}, {labels[i]!r} on row {i + 1})"
        elif split and split[i] != split[j]:
            why = f"in two splits ({split[j]} on row {j + 1}, {split[i]} on row {i + 1}): that leaks it between them"
        else:
            why = f"twice (rows {j + 1} and {i + 1})"
        raise L2BError(f"{path}: {f} is listed {why}; list every image once")


PATH_KINDS = {"npz": load_npz, "folder": load_folder, "csv": load_csv}
for _kind, _loader in PATH_KINDS.items():
    DATA_FORMATS.register(_kind)(_loader)


@dataclass
class Arrays:
    """Inputs (N, ...) with optional labels (N,) and source files (N,)."""

    x: np.ndarray
    y: np.ndarray | None = None
    paths: list[str] | None = None


def read_npz(path: str, split: str | None = None) -> Arrays:
    """An ``.npz`` with inputs under ``x`` (or ``x_test``) and optional labels under ``y`` (or ``y_test``);
    with ``split`` ("test" or "val"), a training file's (one with ``x_train``) ``x_<split>``, ``y_<split>``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            order = (f"x_{split}",) if split and "x_train" in keys else ("x", "x_test") if split != "val" else ("x",)
            xk = next((k for k in order if k in keys), None)
            if xk is None:
                raise L2BError(f"{path}: no array named {' or '.join(repr(k) for k in order)} "
                               f"(found: {', '.join(sorted(keys)) or 'none'})")
            yk = "y" + xk[1:]
            return Arrays(z[xk], z[yk].astype(np.int64) if yk in keys else None)
    except (OSError, ValueError) as exc:
        raise L2BError(f"cannot read {path} as .npz ({exc})") from None


def read_folder(path: str, classes: list[str], image_size: int | None, split: str | None = None) -> Arrays:
    """Every image file under ``path`` (recursively, sorted). When the files sit in sub-folders named
    after the run's classes, those names are the labels (for `l2b eval`). ``split="test"``: a training
    layout's (train/, val/, test/) ``test/`` only."""
    root = Path(path)
    if split and any((root / s).is_dir() for s in ("train", "val", "test")):
        if not (root / split).is_dir():
            raise L2BError(f"{root}: no {split}/ split here (a folder in the training layout gives its {split}/ only)")
        root = root / split
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise L2BError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    parents = [f.parent.name for f in files]
    labelled = all(f.parent != root for f in files) and set(parents) <= set(classes)
    y = np.asarray([classes.index(c) for c in parents], dtype=np.int64) if labelled else None
    return Arrays(decode_images(files, image_size), y, [str(f) for f in files])


def read_csv(path: str, classes: list[str], image_size: int | None, split: str | None = None) -> Arrays:
    """Rows ``path[,label]`` (a header row is allowed), paths relative to the CSV's folder and never
    outside it; labels are class indices or the run's class names. ``split="test"``: of a training
    listing (rows ``path,label,split``), the rows of the test split only."""
    csv_path = Path(path)
    rows = read_listing(csv_path, "path[,label]")
    if split and any(len(r) >= 3 for r in rows):
        rows = [r for r in rows if len(r) >= 3 and SPLIT_NAMES.get(r[2].lower()) == split]
        if not rows:
            raise L2BError(f"{csv_path}: no row of the {split} split (a listing with a split column gives that "
                           "split's rows only)")
    files = [inside(csv_path.parent, r[0], csv_path) for r in rows]
    y = None
    if all(len(r) >= 2 and r[1] for r in rows):
        names = [r[1] for r in rows]
        if all(v in classes for v in names):
            y = np.asarray([classes.index(v) for v in names], dtype=np.int64)
        elif all(v.lstrip("-").isdigit() for v in names):
            y = np.asarray([int(v) for v in names], dtype=np.int64)
        else:
            bad = next(v for v in names if v not in classes)
            raise L2BError(f"{csv_path}: label {bad!r} is neither a class index nor one of {classes}")
    return Arrays(decode_images(files, image_size), y, [str(f) for f in files])


# kind -> reader(path, classes, image_size, split) -> Arrays
SOURCES = {"npz": lambda path, classes, size, split=None: read_npz(path, split), "folder": read_folder,
           "csv": read_csv}


def read_inputs(spec: str, classes: list[str] | None = None, image_size: int | None = None,
                split: str | None = None) -> Arrays:
    """Read ``KIND:PATH`` (e.g. ``npz:test.npz``, ``folder:imgs``, ``csv:list.csv``) with the reader
    registered for KIND; image files are decoded at ``image_size`` (the run's input size). With
    ``split`` ("test": `l2b eval`; "val": ``--trusted``), a source in the training layout gives that split only."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise L2BError(f"--data must be KIND:PATH with KIND one of {', '.join(sorted(SOURCES))}, got {spec!r}")
    check_choice("data source", kind, SOURCES)
    if not Path(path).exists():
        raise L2BError(f"--data {spec}: {path} does not exist")
    return SOURCES[kind](path, list(classes or []), image_size, split)
