"""The built-in benchmarks: Fashion-MNIST (the embedded default) and CIFAR-10/100.

Fashion-MNIST is read from its gzip IDX files (Debian's ``dataset-fashion-mnist`` package, a
``--data-dir``, ``$L2B_DATA`` or the cache), fetched with MD5 checks otherwise; CIFAR from the
python-pickle batches through a restricted unpickler.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from ..errors import L2BError
from .arrays import ImageData
from .fetch import cache_dir, fetch, search_dirs
from .sources import check_labels, register_dataset

__all__ = ["load_fashion_mnist", "read_idx", "read_cifar_pickle", "load_cifar10", "load_cifar100",
           "FASHION_MNIST_CLASSES", "BENCHMARK_PRESET"]


# The benchmark recipe, the preset of the built-in benchmarks (a user's own data has none: its labels
# as given, all of its images). Their labels are the truth, so synthetic noise is injected and the
# clean set is carved from the true labels before noise; 3,000 noisy images keep a run to minutes on
# 2 CPU cores, long enough for plain CE to start memorising the noise (docs/RESULTS.md); the test curve
# is recorded every epoch, as the paper's tables read the max over epochs. The clean batch is the training
# batch (m = n, val_batch_size 0), as the published code draws it: the recipe study chose it on clean
# validation accuracy at the development setting (docs/RESULTS.md, "Recipe study").
BENCHMARK_PRESET = dict(noise="sym", noise_rate=0.4, subset=3000, val_size=1000, test_every=1, val_batch_size=0)


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


# MD5 of the canonical .gz files (as published with the data set)
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read one gzip-compressed IDX file (the MNIST format) into a uint8 array."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise L2BError(f"{path}: not a readable gzip file ({exc}); delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise L2BError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()  # writable, owns its memory
    if data.size != int(np.prod(dims)):
        raise L2BError(f"{path}: truncated IDX file ({data.size} bytes for shape {dims})")
    return data.reshape(dims)


def fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    dirs = []
    if data_dir:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    if os.environ.get("L2B_DATA"):
        dirs += [Path(os.environ["L2B_DATA"]), Path(os.environ["L2B_DATA"]) / "fashion-mnist"]
    dirs.append(cache_dir() / "fashion-mnist")
    dirs.append(DEBIAN_FASHION_MNIST)
    return dirs


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> ImageData:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train and 10,000 test images, 1 x 28 x 28, 10 classes.

    Looked for in ``data_dir``, ``$L2B_DATA``, the user cache dir and Debian's
    /usr/share/datasets/fashion-mnist; fetched (MD5-checked) into the cache dir otherwise.
    """
    for d in fashion_mnist_dirs(data_dir):
        if all((d / f).is_file() for f in FASHION_MNIST_FILES):
            return _read_fashion_mnist(d)
    target = cache_dir() / "fashion-mnist"
    if download:
        try:
            fetch(FASHION_MNIST_URL, FASHION_MNIST_FILES, target)
            return _read_fashion_mnist(target)
        except OSError as exc:
            reason = f"fetching it failed ({exc})"
    else:
        reason = "fetching is disabled"
    raise L2BError(
        f"Fashion-MNIST not found and {reason}. Install Debian's package (apt-get install dataset-fashion-mnist), "
        f"or put the four *-ubyte.gz files in a folder and pass --data-dir FOLDER (or set L2B_DATA)"
    )


def _read_fashion_mnist(folder: Path) -> ImageData:
    x_train = read_idx(folder / "train-images-idx3-ubyte.gz")[:, None]
    y_train = read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    x_test = read_idx(folder / "t10k-images-idx3-ubyte.gz")[:, None]
    y_test = read_idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if len(x) != len(y):
            raise L2BError(f"{folder}: {split} images ({len(x)}) and labels ({len(y)}) differ in length")
    return ImageData("fashion-mnist", list(FASHION_MNIST_CLASSES), x_train, y_train, x_test, y_test)


@register_dataset("fashion-mnist", **BENCHMARK_PRESET)
def _fashion_mnist(cfg) -> ImageData:
    return load_fashion_mnist(cfg.data_dir)


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
    for d in search_dirs(cfg, folder) + [cache_dir() / folder]:
        for cand in (d, d / folder):
            if (cand / marker).is_file():
                return cand
    target = cache_dir()
    try:
        fetch(CIFAR_URL, {archive: md5}, target)
        with tarfile.open(target / archive) as tar:
            tar.extractall(target, filter="data")  # refuses absolute paths and links out of target
    except (OSError, tarfile.TarError) as exc:
        raise L2BError(
            f"{name} not found on disk and fetching {archive} failed ({exc}). Put the extracted {folder}/ folder "
            f"(from {CIFAR_URL}{archive}) under --data-dir or $L2B_DATA"
        ) from None
    return target / folder


@register_dataset("cifar10", **BENCHMARK_PRESET)
def load_cifar10(cfg) -> ImageData:
    """CIFAR-10: 50,000 train / 10,000 test images 3 x 32 x 32, 10 classes (python batches)."""
    root = _cifar_root(cfg, "cifar10")
    parts = [_cifar_images(read_cifar_pickle(root / f"data_batch_{i}"), root / f"data_batch_{i}", "labels")
             for i in range(1, 6)]
    x_test, y_test = _cifar_images(read_cifar_pickle(root / "test_batch"), root / "test_batch", "labels")
    classes = _names(read_cifar_pickle(root / "batches.meta"), "label_names", 10, root / "batches.meta")
    return ImageData("cifar10", classes, np.concatenate([p[0] for p in parts]),
                     np.concatenate([p[1] for p in parts]), x_test, y_test)


@register_dataset("cifar100", **BENCHMARK_PRESET)
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
    check_labels(y_train, 100, f"{root / 'train'}: fine labels")
    coarse = np.full(100, -1, dtype=np.int64)
    coarse[y_train] = coarse_labels
    if np.any(coarse[y_train] != coarse_labels) or np.any(coarse < 0):
        raise L2BError(f"{root / 'train'}: each fine class must belong to exactly one superclass")
    return ImageData("cifar100", classes, x_train, y_train, x_test, y_test, coarse=coarse)
