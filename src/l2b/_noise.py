"""Label-noise generators: pure functions ``(labels, rate, rng, ...) -> NoisyLabels``.

Convention, everywhere in l2b: a transition matrix T has rows = true class, columns = observed class,
and each row sums to one (T[i, j] = P(observed j | true i)); a class with no samples gets the
identity row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._errors import L2BError

__all__ = ["NoisyLabels", "symmetric", "class_map_noise", "transition_matrix", "FASHION_MNIST_ASYM_MAP"]

# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot. Visually confusable pairs, in the spirit of the CIFAR-10 map of
# Patrini et al. 2017: T-shirt <-> Shirt (as cat <-> dog), Pullover -> Coat, Sandal -> Sneaker,
# Sneaker -> Ankle boot. Trouser, Dress, Coat, Bag and Ankle boot keep their label.
FASHION_MNIST_ASYM_MAP = {0: 6, 6: 0, 2: 4, 5: 7, 7: 9}


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
