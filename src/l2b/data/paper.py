"""The paper's other data sets: ISIC2019 (challenge CSV + JPEGs) and Clothing1M (official lists)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import L2BError
from .arrays import ImageData, balanced_clean_split
from .benchmarks import BENCHMARK_PRESET
from .fetch import search_dirs
from .images import inside, load_images
from .sources import check_labels, register_dataset
from .user import SPLIT_NAMES

__all__ = ["load_isic2019", "load_clothing1m", "read_isic_csv", "isic_split", "PAPER_IMAGE_SIZE"]


ISIC_CSV = "ISIC_2019_Training_GroundTruth.csv"


ISIC_IMAGES = "ISIC_2019_Training_Input"


ISIC_SPLIT = (20400, 640, 4291)  # the paper's train / clean / test sizes (25,331 images)


PAPER_IMAGE_SIZE = 224  # ISIC2019 and Clothing1M default when --image-size is not given


def _find_root(cfg, sub: str, marker: str, what: str) -> Path:
    for d in search_dirs(cfg, sub):
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


@register_dataset("isic2019", **BENCHMARK_PRESET)
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
    files = [inside(root, f"{ISIC_IMAGES}/{i}.jpg", root / ISIC_CSV) for i in ids]
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
                inside(root, parts[0], path)
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
        inside(root, k, path)
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
        check_labels(y, len(CLOTHING1M_CLASSES), f"{source}: labels")
        files = [root / k for k in keys]
        splits[name] = (load_images(files, cfg.image_size or PAPER_IMAGE_SIZE, cfg), y, files)
    x_train, y_train, files = splits["train"]
    return ImageData("clothing1m", list(CLOTHING1M_CLASSES), x_train, y_train, splits["test"][0], splits["test"][1],
                     x_val=splits["val"][0], y_val=splits["val"][1], noisy_train=y_train.copy(),
                     train_labels_known=False, paths=[str(f) for f in files])
