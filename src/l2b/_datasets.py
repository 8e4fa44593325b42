"""Data set loaders: a registry ``name -> loader(cfg) -> ImageData``, plus ``npz:``, ``folder:`` and ``csv:`` paths.

Every loader returns uint8 images (N, C, H, W) in memory and integer labels; :func:`load_dataset`
then checks what every data set must satisfy (lengths, label ranges, a clean set with every class,
one image shape) so a bad file fails before training with one line naming it.

Image files (ISIC2019, Clothing1M, folders, CSV lists) are decoded once with Pillow (an optional
dependency) at a fixed size (``--image-size``) by a thread pool; there is no per-batch decoding.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ._data import ImageData, ImageFiles, _fetch, balanced_clean_split, cache_dir, load_fashion_mnist
from ._errors import L2BError, check_choice

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "register_dataset", "load_dataset", "check_data", "PATH_KINDS"]

DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    """Decorator: make ``loader(cfg) -> ImageData`` available as ``--dataset NAME``."""

    def add(fn):
        DATASETS[name] = fn
        return fn

    return add


def load_dataset(cfg) -> ImageData:
    """Load ``cfg.dataset`` (a registered name or ``npz:PATH``, ``folder:PATH``, ``csv:PATH``) and check it."""
    kind, _, rest = cfg.dataset.partition(":")
    if rest and kind in PATH_KINDS:
        data = PATH_KINDS[kind](Path(rest), cfg)
        source = rest
    else:
        check_choice("dataset", cfg.dataset, list(DATASETS) + [k + ":PATH" for k in PATH_KINDS])
        data = DATASETS[cfg.dataset](cfg)
        source = cfg.dataset
    check_data(data, source)
    if not data.train_labels_known and data.x_val is None:
        raise L2BError(f"{source}: the training labels are not known to be clean, so no clean set can be carved "
                       "from them; the data must bring its own clean (val) split")
    return data


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
        if x.dtype != np.uint8 or x.ndim != 4:
            raise L2BError(f"{source}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if shape is not None and x.shape[1:] != shape:
            raise L2BError(f"{source}: {split} images are {x.shape[1:]}, train images {shape} (C, H, W); "
                           "pass --image-size N to resize them all")
        shape = x.shape[1:]
        _check_labels(y, k, f"{source}: {split} labels")
    if data.noisy_train is not None:
        if len(data.noisy_train) != len(data.y_train):
            raise L2BError(f"{source}: {len(data.noisy_train)} noisy labels for {len(data.y_train)} training images")
        _check_labels(data.noisy_train, k, f"{source}: noisy train labels")
    if data.y_val is not None:
        missing = np.setdiff1d(np.arange(k), data.y_val)
        if missing.size:
            c = int(missing[0])
            raise L2BError(f"{source}: class {c} ({data.classes[c]!r}) has no image in the clean (val) set; "
                           "every class needs clean images")
    if len(data.y_test) == 0:
        raise L2BError(f"{source}: the test split is empty")


def _check_labels(y: np.ndarray, k: int, what: str) -> None:
    if y.size and (y.min() < 0 or y.max() >= k):
        i = int(np.flatnonzero((y < 0) | (y >= k))[0])
        raise L2BError(f"{what}: label {int(y[i])} at entry {i} is out of range; classes are 0..{k - 1}")


def _search_dirs(cfg, sub: str) -> list[Path]:
    dirs = []
    for base in (cfg.data_dir, os.environ.get("L2B_DATA")):
        if base:
            dirs += [Path(base), Path(base) / sub]
    dirs.append(cache_dir() / sub)
    return dirs


# ---------------------------------------------------------------- Fashion-MNIST

@register_dataset("fashion-mnist")
def _fashion_mnist(cfg) -> ImageData:
    return load_fashion_mnist(cfg.data_dir)


# ---------------------------------------------------------------- CIFAR-10/100 (python pickles)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
# name: (archive, MD5 of the archive as published, folder inside it)
CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}


def _multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return multiarray


class _Refused(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds: dicts, lists, str, bytes, ints, numpy arrays and scalars.

    Any other global (``os.system``, ``builtins.eval`` ...) is refused, so a crafted file cannot
    run code. Python-2 pickles (the published batches) need ``encoding="bytes"``.
    """

    def find_class(self, module, name):
        if name in ("_reconstruct", "scalar") and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return getattr(_multiarray(), name)  # array and numpy-scalar reconstruction only
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles spell bytes
            import codecs

            return codecs.encode
        raise _Refused(f"refused global {module}.{name} (a CIFAR batch never contains it)")


def read_cifar_pickle(path: Path) -> dict:
    """One CIFAR python batch as a dict with str keys, through the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            obj = _BatchUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except OSError as exc:
        raise L2BError(f"cannot read {path}: {exc.strerror}") from None
    except _Refused as exc:
        raise L2BError(f"{path}: not a CIFAR batch ({exc}); delete it and fetch the data set again") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle raises almost anything
        raise L2BError(f"{path}: corrupt pickle ({type(exc).__name__}: {exc}); delete it and fetch it again") from None
    if not isinstance(obj, dict):
        raise L2BError(f"{path}: not a CIFAR batch (a {type(obj).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_images(batch: dict, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = batch.get("data"), batch.get(label_key)
    if not isinstance(x, np.ndarray) or y is None:
        raise L2BError(f"{path}: a CIFAR batch needs 'data' (array) and {label_key!r}")
    y = np.asarray(y, dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise L2BError(f"{path}: 'data' must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    if len(x) != len(y):
        raise L2BError(f"{path}: {len(x)} images but {len(y)} labels")
    return x.reshape(-1, 3, 32, 32), y


def _names(meta: dict, key: str, k: int, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != k:
        raise L2BError(f"{path}: {key!r} must list {k} class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_root(cfg, name: str) -> Path:
    archive, md5, folder = CIFAR_ARCHIVES[name]
    marker = "data_batch_1" if name == "cifar10" else "train"
    for d in _search_dirs(cfg, folder) + [cache_dir() / folder]:
        for cand in (d, d / folder):
            if (cand / marker).is_file():
                return cand
    target = cache_dir()
    try:
        _fetch(CIFAR_URL, {archive: md5}, target)
        with tarfile.open(target / archive) as tar:
            tar.extractall(target, filter="data")  # refuses absolute paths and links out of target
    except (OSError, tarfile.TarError) as exc:
        raise L2BError(
            f"{name} not found on disk and fetching {archive} failed ({exc}). Put the extracted {folder}/ folder "
            f"(from {CIFAR_URL}{archive}) under --data-dir or $L2B_DATA"
        ) from None
    return target / folder


@register_dataset("cifar10")
def load_cifar10(cfg) -> ImageData:
    """CIFAR-10: 50,000 train / 10,000 test images 3 x 32 x 32, 10 classes (python batches)."""
    root = _cifar_root(cfg, "cifar10")
    parts = [_cifar_images(read_cifar_pickle(root / f"data_batch_{i}"), root / f"data_batch_{i}", "labels")
             for i in range(1, 6)]
    x_test, y_test = _cifar_images(read_cifar_pickle(root / "test_batch"), root / "test_batch", "labels")
    classes = _names(read_cifar_pickle(root / "batches.meta"), "label_names", 10, root / "batches.meta")
    return ImageData("cifar10", classes, np.concatenate([p[0] for p in parts]),
                     np.concatenate([p[1] for p in parts]), x_test, y_test)


@register_dataset("cifar100")
def load_cifar100(cfg) -> ImageData:
    """CIFAR-100: 50,000 train / 10,000 test images 3 x 32 x 32, 100 classes in 20 superclasses."""
    root = _cifar_root(cfg, "cifar100")
    train = read_cifar_pickle(root / "train")
    x_train, y_train = _cifar_images(train, root / "train", "fine_labels")
    x_test, y_test = _cifar_images(read_cifar_pickle(root / "test"), root / "test", "fine_labels")
    classes = _names(read_cifar_pickle(root / "meta"), "fine_label_names", 100, root / "meta")
    coarse_labels = np.asarray(train.get("coarse_labels", []), dtype=np.int64)
    if len(coarse_labels) != len(y_train):
        raise L2BError(f"{root / 'train'}: 'coarse_labels' must give one superclass per image")
    _check_labels(y_train, 100, f"{root / 'train'}: fine labels")
    coarse = np.full(100, -1, dtype=np.int64)
    coarse[y_train] = coarse_labels
    if np.any(coarse[y_train] != coarse_labels) or np.any(coarse < 0):
        raise L2BError(f"{root / 'train'}: each fine class must belong to exactly one superclass")
    return ImageData("cifar100", classes, x_train, y_train, x_test, y_test, coarse=coarse)


# ---------------------------------------------------------------- image files (Pillow)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise L2BError("reading image files needs Pillow, which is not installed: pip install Pillow") from None
    return Image


def _decode_one(Image, path: Path, size: int | None) -> np.ndarray:
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
    Image = _pil()
    if not paths:
        return np.zeros((0, 1, size or 1, size or 1), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow releases the GIL
        arrays = list(pool.map(lambda p: _decode_one(Image, p, size), paths))
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


def load_images(paths: list[Path], size: int | None, cfg) -> np.ndarray | ImageFiles:
    """The images of ``paths``: decoded (uint8 (N, C, H, W)), or with ``cfg.stream`` the files, decoded per batch."""
    if not getattr(cfg, "stream", False):
        return decode_images(paths, size)
    if size is None:
        raise L2BError("--stream decodes images per batch, so they must share one size: pass --image-size N")
    _pil()
    return ImageFiles.probe(paths, size, seed=cfg.seed) if paths else ImageFiles([], size, 1)


def _inside(root: Path, rel: str, listing: Path) -> Path:
    """``root / rel``, refusing a path that leaves ``root`` (absolute, ``..``, or a link out)."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise L2BError(f"{listing}: path {rel!r} escapes the folder {root}; paths must stay inside it")
    return path


# ---------------------------------------------------------------- ISIC2019 (challenge CSV + JPEGs)

ISIC_CSV = "ISIC_2019_Training_GroundTruth.csv"
ISIC_IMAGES = "ISIC_2019_Training_Input"
ISIC_SPLIT = (20400, 640, 4291)  # the paper's train / clean / test sizes (25,331 images)
PAPER_IMAGE_SIZE = 224  # ISIC2019 and Clothing1M default when --image-size is not given


def _find_root(cfg, sub: str, marker: str, what: str) -> Path:
    for d in _search_dirs(cfg, sub):
        for cand in (d, d / "annotations"):
            if (cand / marker).is_file():
                return d
    raise L2BError(f"{what} not found: no {marker} under --data-dir, $L2B_DATA or their {sub}/ folder; "
                   f"download it from its publisher and pass --data-dir FOLDER (it is not fetched automatically)")


def read_isic_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(image ids, class names, labels) from the challenge's one-hot ground-truth CSV."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise L2BError(f"cannot read {path}: {exc.strerror}") from None
    if not rows or rows[0][0] != "image" or len(rows[0]) < 3:
        raise L2BError(f"{path}: expected a header image,<class>,<class>,... (the challenge's ground-truth CSV)")
    header, ids, onehot = rows[0][1:], [], []
    for i, r in enumerate(rows[1:], 2):
        try:
            v = np.asarray([float(c) for c in r[1:]])
        except ValueError:
            raise L2BError(f"{path}: line {i}: class columns must be 0 or 1") from None
        if len(v) != len(header) or not (np.isin(v, (0.0, 1.0)).all() and v.sum() == 1):
            raise L2BError(f"{path}: line {i}: expected exactly one 1 among {len(header)} class columns")
        ids.append(r[0])
        onehot.append(int(v.argmax()))
    y = np.asarray(onehot, dtype=np.int64)
    present = np.unique(y)  # the challenge's UNK column has no training image: drop empty classes
    return ids, [header[c] for c in present], np.searchsorted(present, y)


def isic_split(y: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Seeded split labels ('train' | 'val' | 'test') per image: a class-balanced clean set and a random
    test set of the paper's sizes (20,400 / 640 / 4,291 for the full 25,331 images, proportional otherwise)."""
    n = len(y)
    n_val = max(num_classes, round(n * ISIC_SPLIT[1] / sum(ISIC_SPLIT)))
    n_test = max(1, round(n * ISIC_SPLIT[2] / sum(ISIC_SPLIT)))
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    val = balanced_clean_split(y, n_val, num_classes, rng)
    split[val] = "val"
    rest = np.flatnonzero(split == "train")
    split[rng.choice(rest, size=n_test, replace=False)] = "test"
    return split


@register_dataset("isic2019")
def load_isic2019(cfg) -> ImageData:
    """ISIC2019 (the challenge's training part): ISIC_2019_Training_GroundTruth.csv and
    ISIC_2019_Training_Input/<image>.jpg; split seeded as in the paper, or given by --split-file
    (CSV image,split). The split is saved to the run folder as split.csv."""
    root = _find_root(cfg, "isic2019", ISIC_CSV, "ISIC2019")
    ids, classes, y = read_isic_csv(root / ISIC_CSV)
    if cfg.split_file:
        split = _read_split_file(Path(cfg.split_file), ids)
    else:
        split = isic_split(y, len(classes), cfg.seed)
    size = cfg.image_size or PAPER_IMAGE_SIZE
    files = [_inside(root, f"{ISIC_IMAGES}/{i}.jpg", root / ISIC_CSV) for i in ids]
    x = load_images(files, size, cfg)
    part = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    return ImageData("isic2019", classes, x[part["train"]], y[part["train"]], x[part["test"]], y[part["test"]],
                     x_val=x[part["val"]], y_val=y[part["val"]], paths=[str(files[i]) for i in part["train"]],
                     files={"split.csv": "image,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, split))})


def _read_split_file(path: Path, ids: list[str]) -> np.ndarray:
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except OSError as exc:
        raise L2BError(f"cannot read split file {path}: {exc.strerror}") from None
    given = {r[0].strip(): r[1].strip().lower() for r in rows if len(r) >= 2 and r[0] != "image"}
    split = np.empty(len(ids), dtype=object)
    for i, name in enumerate(ids):
        s = SPLIT_NAMES.get(given.get(name, ""))
        if s is None:
            raise L2BError(f"{path}: image {name!r} has no split (train, val or test)")
        split[i] = s
    return split


# ---------------------------------------------------------------- Clothing1M (key lists)

CLOTHING1M_CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
                      "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]


def _read_kv(path: Path, root: Path) -> dict[str, int]:
    out = {}
    try:
        with open(path) as fh:
            for i, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise L2BError(f"{path}: line {i}: expected '<image path> <label>'")
                _inside(root, parts[0], path)
                out[parts[0]] = int(parts[1])
    except OSError as exc:
        raise L2BError(f"cannot read {path}: {exc.strerror}") from None
    return out


def _read_keys(path: Path, root: Path) -> list[str]:
    try:
        keys = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise L2BError(f"cannot read {path}: {exc.strerror}") from None
    for k in keys:
        _inside(root, k, path)
    return keys


@register_dataset("clothing1m")
def load_clothing1m(cfg) -> ImageData:
    """Clothing1M (Xiao et al. 2015): noisy_label_kv.txt, clean_label_kv.txt, noisy_train_key_list.txt,
    clean_val_key_list.txt, clean_test_key_list.txt (in the root or annotations/), image paths relative
    to the root. Trains on the noisy labels (truth unknown), the clean val images are the clean set.

    All images are decoded into memory at --image-size (default 224): with ``--subset N`` only N
    training images (seeded) are decoded; with ``--stream`` none are, they are decoded per batch. The paper's epoch of 250 class-balanced batches is
    ``--balanced-batches 250``.
    """
    root = _find_root(cfg, "clothing1m", "noisy_label_kv.txt", "Clothing1M")
    ann = root / "annotations" if (root / "annotations" / "noisy_label_kv.txt").is_file() else root
    noisy = _read_kv(ann / "noisy_label_kv.txt", root)
    clean = _read_kv(ann / "clean_label_kv.txt", root)
    keys_path = ann / "noisy_train_key_list.txt"
    train_keys = _read_keys(keys_path, root) if keys_path.is_file() else sorted(noisy)
    splits = {}
    for name, kv, keys_file in (("val", clean, "clean_val_key_list.txt"), ("test", clean, "clean_test_key_list.txt"),
                                ("train", noisy, None)):
        keys = train_keys if keys_file is None else _read_keys(ann / keys_file, root)
        source = ann / (keys_file or "noisy_label_kv.txt")
        absent = [k for k in keys if k not in kv]
        if absent:
            raise L2BError(f"{source}: {len(absent)} key(s) have no label, e.g. {absent[0]!r}")
        if name == "train" and cfg.subset and cfg.subset < len(keys):
            keys = [keys[i] for i in np.sort(np.random.default_rng(cfg.seed).choice(len(keys), cfg.subset, replace=False))]
        y = np.asarray([kv[k] for k in keys], dtype=np.int64)
        _check_labels(y, len(CLOTHING1M_CLASSES), f"{source}: labels")
        files = [root / k for k in keys]
        splits[name] = (load_images(files, cfg.image_size or PAPER_IMAGE_SIZE, cfg), y, files)
    x_train, y_train, files = splits["train"]
    return ImageData("clothing1m", list(CLOTHING1M_CLASSES), x_train, y_train, splits["test"][0], splits["test"][1],
                     x_val=splits["val"][0], y_val=splits["val"][1], noisy_train=y_train.copy(),
                     train_labels_known=False, paths=[str(f) for f in files])


# ---------------------------------------------------------------- user data: npz, folder, csv

def _to_nchw(x: np.ndarray, name: str) -> np.ndarray:
    """Images N x H x W, N x H x W x C or N x C x H x W (uint8, or float in [0, 1] or [0, 255]) -> uint8 NCHW."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise L2BError(f"{name}: images must be N x H x W, N x H x W x C or N x C x H x W, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise L2BError(f"{name}: images must be uint8 or float, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise L2BError(f"{name}: images contain NaN or infinity")
    if x.size and x.max() <= 1.0:
        x = x * 255.0  # float images in [0, 1]
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _int_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise L2BError(f"{name}: labels must be 1-D, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise L2BError(f"{name}: labels must be integers, got {y.dtype}")
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
    except (OSError, ValueError, EOFError) as exc:
        raise L2BError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise L2BError(f"{path}: missing array(s) {', '.join(missing)} (found {', '.join(sorted(arrays)) or 'none'})")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise L2BError(f"{path}: give both x_val and y_val, or neither")
    splits = {}
    for s in ("train", "val", "test"):
        if f"x_{s}" not in arrays:
            continue
        x = _to_nchw(arrays[f"x_{s}"], f"{path}: x_{s}")
        y = _int_labels(arrays[f"y_{s}"], f"{path}: y_{s}")
        if len(x) != len(y):
            raise L2BError(f"{path}: x_{s} has {len(x)} images but y_{s} has {len(y)} labels")
        splits[s] = (x, y)
    k = int(max(y.max() for _, y in splits.values() if y.size)) + 1
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"]]
        if len(classes) < k:
            raise L2BError(f"{path}: label {k - 1} is out of range for the {len(classes)} names in 'classes'")
    else:
        classes = [str(c) for c in range(k)]
    val = splits.get("val", (None, None))
    return ImageData(f"npz:{path}", classes, *splits["train"], *splits["test"], x_val=val[0], y_val=val[1])


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
        files.append(_inside(root, r[0], path))
        labels.append(r[1])
        if len(r) == 3:
            if r[2].lower() not in SPLIT_NAMES:
                raise L2BError(f"{path}: row {i}: split {r[2]!r} is not train, val or test")
            split.append(SPLIT_NAMES[r[2].lower()])
    if split and len(split) != len(rows):
        raise L2BError(f"{path}: give a split on every row or on none")
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


PATH_KINDS = {"npz": load_npz, "folder": load_folder, "csv": load_csv}


# ---------------------------------------------------------------- `l2b data check`

def data_check(cfg) -> dict:
    """What ``l2b train`` would train on with ``cfg``: split sizes and per-class counts, image shape,
    clean-set balance, and the realised noise (rate and transition matrix, or "unknown")."""
    import torch

    from ._train import prepare_data  # the same split and noise code as training

    data = load_dataset(cfg)
    td = prepare_data(cfg, data, torch.device("cpu"), trains_on_clean=False)
    k = data.num_classes

    def counts(y) -> list[int]:
        return np.bincount(y.numpy(), minlength=k).tolist()

    clean = counts(td.y_clean)
    return {
        "dataset": data.name, "classes": data.classes, "image_shape": list(data.image_shape),
        "num_train": len(td.y_observed), "num_clean": len(td.y_clean), "num_test": len(td.y_test),
        "train_observed_counts": counts(td.y_observed), "clean_counts": clean, "test_counts": counts(td.y_test),
        "clean_balance": min(clean) / max(max(clean), 1),
        **td.noise_info,
    }


def format_data_check(r: dict) -> str:
    rate = "unknown" if r["noise_rate_actual"] is None else f"{100 * r['noise_rate_actual']:.2f}%"
    width = max(6, *(len(c) for c in r["classes"]))
    lines = [
        f"data set {r['dataset']}: {len(r['classes'])} classes, images {tuple(r['image_shape'])} (C, H, W)",
        f"train {r['num_train']} (observed labels), clean {r['num_clean']}, test {r['num_test']}",
        f"clean-set balance (smallest / largest class): {r['clean_balance']:.2f}",
        f"noise {r['noise']} at {100 * r['noise_rate']:.0f}%: realised rate {rate}",
        f"{'class':<{width}} {'train':>7} {'clean':>7} {'test':>7}",
    ]
    for i, c in enumerate(r["classes"]):
        lines.append(f"{c:<{width}} {r['train_observed_counts'][i]:>7} {r['clean_counts'][i]:>7} {r['test_counts'][i]:>7}")
    if r["transition_matrix"] is None:
        lines.append("transition matrix: unknown (the true training labels are not known)")
    else:
        lines.append("transition matrix (rows: true class, columns: observed; rows sum to 1):")
        lines += ["  " + " ".join(f"{v:5.2f}" for v in row) for row in r["transition_matrix"]]
    return "\n".join(lines)
