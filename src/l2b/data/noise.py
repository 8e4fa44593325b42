"""Label-noise generators: pure functions ``(labels, rate, rng, ...) -> NoisyLabels``.

Convention, everywhere in l2b: a transition matrix T has rows = true class, columns = observed class,
and each row sums to one (T[i, j] = P(observed j | true i)); a class with no samples gets the
identity row.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..config import NOISE_MODELS
from ..errors import L2BError, check_choice

__all__ = [
    "NoisyLabels", "symmetric", "uniform", "class_map_noise", "pairflip", "instance", "transition_matrix",
    "cifar100_asym_map", "load_class_map", "load_label_file", "make_noise",
    "FASHION_MNIST_ASYM_MAP", "CIFAR10_ASYM_MAP",
]

log = logging.getLogger(__name__)

# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot. Visually confusable pairs, in the spirit of the CIFAR-10 map of
# Patrini et al. 2017: T-shirt <-> Shirt (as cat <-> dog), Pullover -> Coat, Sandal -> Sneaker,
# Sneaker -> Ankle boot. Trouser, Dress, Coat, Bag and Ankle boot keep their label.
FASHION_MNIST_ASYM_MAP = {0: 6, 6: 0, 2: 4, 5: 7, 7: 9}

# CIFAR-10 (Patrini et al. 2017, "Making deep neural networks robust to label noise: a loss correction
# approach", and the paper's Table 1): truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
# Classes: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
CIFAR10_ASYM_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


@dataclass(frozen=True)
class NoisyLabels:
    """The outcome of a noise model.

    Attributes
    ----------
    labels : np.ndarray, shape (N,), int64
        The observed (noisy) labels.
    transition : np.ndarray, shape (K, K)
        The realised transition matrix (rows: true class, columns: observed; rows sum to one).
    rate : float
        The realised fraction of samples whose observed label differs from the true one.
    """

    labels: np.ndarray
    transition: np.ndarray
    rate: float


def transition_matrix(true: np.ndarray, observed: np.ndarray, num_classes: int) -> np.ndarray:
    """Realised T (K, K): T[i, j] = fraction of class-i samples observed as j; empty rows = identity."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (true, observed), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    eye = np.eye(num_classes)
    return np.where(totals > 0, counts / np.maximum(totals, 1), eye)


def _check(labels: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= rate < 1.0:
        raise L2BError(f"noise rate must be in [0, 1), got {rate}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise L2BError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return labels


def symmetric(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> NoisyLabels:
    """Flip exactly round(rate * N) samples, chosen uniformly, to a different class drawn uniformly.

    Parameters
    ----------
    labels : np.ndarray, shape (N,)
        True labels in [0, num_classes).
    rate : float
        Fraction of samples to flip, in [0, 1).
    num_classes : int
    rng : np.random.Generator

    Examples
    --------
    >>> out = symmetric(np.arange(10) % 5, 0.4, 5, np.random.default_rng(0))
    >>> out.rate
    0.4
    """
    labels = _check(labels, rate, num_classes)
    noisy = labels.copy()
    flip = rng.choice(labels.size, size=int(round(rate * labels.size)), replace=False)
    # an offset in 1..K-1 lands uniformly on the K-1 other classes
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, size=flip.size)) % num_classes
    return _outcome(labels, noisy, num_classes)


def class_map_noise(
    labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator, class_map: dict[int, int]
) -> NoisyLabels:
    """Asymmetric noise: in each mapped class c, exactly round(rate * N_c) samples become class_map[c].

    Classes absent from ``class_map`` keep their labels, so the realised overall rate is below
    ``rate`` whenever some classes are unmapped.
    """
    labels = _check(labels, rate, num_classes)
    for src, dst in class_map.items():
        if not (0 <= src < num_classes and 0 <= dst < num_classes) or src == dst:
            raise L2BError(f"class map entry {src} -> {dst} is not a change between classes 0..{num_classes - 1}")
    noisy = labels.copy()
    for src, dst in sorted(class_map.items()):
        members = np.flatnonzero(labels == src)
        flip = rng.choice(members, size=int(round(rate * members.size)), replace=False)
        noisy[flip] = dst
    return _outcome(labels, noisy, num_classes)


def _outcome(true: np.ndarray, noisy: np.ndarray, num_classes: int) -> NoisyLabels:
    rate = float(np.mean(true != noisy)) if true.size else 0.0
    return NoisyLabels(noisy, transition_matrix(true, noisy, num_classes), rate)


def uniform(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> NoisyLabels:
    """Redraw the label of exactly round(rate * N) samples uniformly over ALL K classes (true one included).

    The convention of some papers (e.g. Patrini et al. 2017's "uniform" noise): the expected fraction of
    changed labels is rate * (K - 1) / K, below ``rate``; the intended matrix is (1 - rate) I + rate / K.
    """
    labels = _check(labels, rate, num_classes)
    noisy = labels.copy()
    redraw = rng.choice(labels.size, size=int(round(rate * labels.size)), replace=False)
    noisy[redraw] = rng.integers(0, num_classes, size=redraw.size)
    return _outcome(labels, noisy, num_classes)


def pairflip(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> NoisyLabels:
    """Pair flipping (Han et al. 2018, "Co-teaching"): in each class c, exactly round(rate * N_c) samples
    become class (c + 1) mod K. Intended matrix: (1 - rate) on the diagonal, rate just right of it."""
    return class_map_noise(labels, rate, num_classes, rng, {c: (c + 1) % num_classes for c in range(num_classes)})


def instance(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator, features: np.ndarray,
             *, std: float = 0.1) -> NoisyLabels:
    """Part-dependent instance noise as generated by Xia et al. 2020 ("Part-dependent label noise: towards
    instance-dependent label noise", NeurIPS; the generator of their released code).

    Each sample draws a flip rate q_i from N(rate, std^2) truncated to [0, 1]; each class c draws a
    projection W_c (D, K) from N(0, 1); sample i with features f_i (D,) and label y moves to class j != y
    with probability q_i * softmax_j(f_i W_y) (the true class masked out) and keeps y with 1 - q_i. The
    expected flip rate is about ``rate``; which samples flip, and where to, depends on the image.

    Parameters
    ----------
    features : np.ndarray, shape (N, D)
        One feature vector per sample (l2b passes the standardised, flattened image).
    """
    labels = _check(labels, rate, num_classes)
    features = np.asarray(features, dtype=np.float32).reshape(len(labels), -1)
    q = rng.normal(rate, std, size=labels.size)
    bad = (q < 0) | (q > 1)
    while bad.any():  # rejection sampling of the truncated normal
        q[bad] = rng.normal(rate, std, size=int(bad.sum()))
        bad = (q < 0) | (q > 1)
    noisy = labels.copy()
    for c in range(num_classes):
        w = rng.standard_normal((features.shape[1], num_classes)).astype(np.float32)  # W_c (D, K)
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            continue
        logits = (features[members] @ w).astype(np.float64)  # (n_c, K)
        logits[:, c] = -np.inf
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p *= (q[members] / p.sum(axis=1))[:, None]
        p[:, c] = 1.0 - q[members]
        cum = np.cumsum(p, axis=1)
        u = rng.random(members.size)[:, None] * cum[:, -1:]
        noisy[members] = np.minimum((u > cum).sum(axis=1), num_classes - 1)
    return _outcome(labels, noisy, num_classes)


def cifar100_asym_map(coarse: np.ndarray) -> dict[int, int]:
    """CIFAR-100 asymmetric map: each class goes to the next class of its superclass, circularly.

    ``coarse`` (K,) is the superclass of each fine class, taken from the data set's own coarse labels;
    "next" is in increasing fine-label order within the superclass.
    """
    mapping = {}
    for sup in np.unique(coarse):
        members = np.flatnonzero(coarse == sup)
        for a, b in zip(members, np.roll(members, -1)):
            if a != b:
                mapping[int(a)] = int(b)
    return mapping


def load_class_map(path: str | Path, classes: list[str]) -> dict[int, int]:
    """Read a user class map (YAML or JSON) for asymmetric noise.

    Two forms. A mapping ``{source: target}`` (class indices or class names) changes the listed classes
    only. A list ``[t_0, ..., t_{K-1}]`` gives the target of every class and must be a permutation of the
    K classes (each class receives exactly one class; fixed points keep their labels).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise L2BError(f"cannot read class map {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise L2BError(f"{path}: class map is not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    k = len(classes)
    names = {name: i for i, name in enumerate(classes)}

    def index(v) -> int:
        if isinstance(v, bool):
            raise L2BError(f"{path}: {v!r} is not a class")
        if isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit() and v not in names):
            i = int(v)
            if not 0 <= i < k:
                raise L2BError(f"{path}: class {i} does not exist (the data has classes 0..{k - 1})")
            return i
        if isinstance(v, str) and v in names:
            return names[v]
        raise L2BError(f"{path}: unknown class {v!r}; use an index 0..{k - 1} or one of: {', '.join(classes)}")

    if isinstance(raw, list):
        targets = [index(v) for v in raw]
        if len(targets) != k or sorted(targets) != list(range(k)):
            raise L2BError(f"{path}: a class map given as a list must be a permutation of the {k} classes "
                           f"(each class exactly once), got {raw}")
        return {i: t for i, t in enumerate(targets) if i != t}
    if isinstance(raw, dict):
        mapping = {}
        for src, dst in raw.items():
            s, d = index(src), index(dst)
            if s == d:
                raise L2BError(f"{path}: class {src!r} maps to itself")
            mapping[s] = d
        if not mapping:
            raise L2BError(f"{path}: the class map is empty")
        return mapping
    raise L2BError(f"{path}: a class map must be a mapping {{source: target}} or a list of K targets, "
                   f"got {type(raw).__name__}")


def load_label_file(path: str | Path, num_train: int, classes: list[str]) -> np.ndarray:
    """The user's noisy label of every training sample: .npy (integer array), .txt (one label per line)
    or .csv (the last column of each row; a header row is skipped). Labels are indices or class names."""
    path = Path(path)
    if not path.is_file():
        raise L2BError(f"noisy-label file {path} not found")
    k, names = len(classes), {name: i for i, name in enumerate(classes)}
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim != 1 or arr.dtype == np.bool_ or not (
                    np.issubdtype(arr.dtype, np.integer)
                    or (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))):
                raise L2BError(f"{path}: expected a 1-D array of integer labels, got {arr.dtype} {arr.shape}")
            labels = arr.astype(np.int64)
        elif suffix in (".txt", ".csv"):
            with open(path, newline="") as fh:
                rows = [r for r in (csv.reader(fh) if suffix == ".csv" else (ln.split() for ln in fh)) if r]
            cells = [r[-1].strip() for r in rows]
            if cells and not cells[0].lstrip("-").isdigit() and cells[0] not in names:
                cells = cells[1:]  # header
            labels = np.empty(len(cells), dtype=np.int64)
            for i, v in enumerate(cells):
                if v in names:
                    labels[i] = names[v]
                elif v.lstrip("-").isdigit():
                    labels[i] = int(v)
                else:
                    raise L2BError(f"{path}: line {i + 1}: {v!r} is neither a class index nor a class name")
        else:
            raise L2BError(f"{path}: noisy labels must be a .npy, .csv or .txt file")
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        raise L2BError(f"{path}: cannot read noisy labels ({str(exc) or type(exc).__name__})") from None
    if len(labels) != num_train:
        raise L2BError(f"{path}: {len(labels)} noisy labels, but the training set has {num_train} images; "
                       "give one label per training image, in the data set's order")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
        raise L2BError(f"{path}: label {labels[bad]} (entry {bad}) is out of range; classes are 0..{k - 1}")
    return labels


# ---------------------------------------------------------------- dispatch



def make_noise(cfg, data, pool: np.ndarray, rng: np.random.Generator) -> NoisyLabels:
    """The observed labels of the training samples ``pool`` (indices into ``data.y_train``).

    ``cfg.noise`` picks the model (see NOISE_MODELS); labels supplied with the data
    (``data.noisy_train``) or by ``file:PATH`` are used as given. Where the true labels are unknown
    (``data.train_labels_known`` False) the returned matrix and rate are not meaningful; callers report
    them as unknown.
    """
    k = data.num_classes
    labels = data.y_train[pool]
    if cfg.noise.startswith("file:"):
        given = load_label_file(cfg.noise[5:], len(data.y_train), data.classes)[pool]
        return _outcome(labels, given, k)
    check_choice("noise model", cfg.noise, list(NOISE_MODELS) + ["file:PATH"])
    if data.noisy_train is not None:
        return _outcome(labels, data.noisy_train[pool], k)
    if cfg.noise == "none" or cfg.noise_rate == 0:
        return NoisyLabels(labels.copy(), np.eye(k), 0.0)
    if cfg.noise == "sym":
        return symmetric(labels, cfg.noise_rate, k, rng)
    if cfg.noise == "uniform":
        return uniform(labels, cfg.noise_rate, k, rng)
    if cfg.noise == "pairflip":
        return pairflip(labels, cfg.noise_rate, k, rng)
    if cfg.noise == "instance":
        x = data.x_train[pool].astype(np.float32) / 255.0
        x = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / (x.std(axis=(0, 2, 3), keepdims=True) + 1e-3)
        return instance(labels, cfg.noise_rate, k, rng, x.reshape(len(pool), -1))
    return class_map_noise(labels, cfg.noise_rate, k, rng, asym_map(cfg, data))


def asym_map(cfg, data) -> dict[int, int]:
    """The class map of ``asym`` noise: the user's ``noise_map`` file, else the data set's documented map."""
    if getattr(cfg, "noise_map", None):
        return load_class_map(cfg.noise_map, data.classes)
    if data.name == "fashion-mnist":
        return FASHION_MNIST_ASYM_MAP
    if data.name == "cifar10":
        return CIFAR10_ASYM_MAP
    if data.name == "cifar100" and data.coarse is not None:
        return cifar100_asym_map(data.coarse)
    raise L2BError(f"no asymmetric class map is defined for data set {data.name!r}; "
                   "give one with --noise-map FILE (YAML/JSON {source: target})")
