"""The area under the ROC curve, the one score both the trainer (the meta-weights' AUROC per epoch) and
``l2b labels`` (how well a ranking finds the wrong labels) report."""

from __future__ import annotations

import numpy as np

try:
    from sklearn.metrics import roc_auc_score

    has_sklearn = True
except ImportError:
    has_sklearn = False

__all__ = ["auroc"]


def auroc(scores: np.ndarray, positive: np.ndarray, *, use_sklearn: bool = True) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive class (higher = more likely positive).

    The probability that a random positive scores higher than a random negative, ties counted one
    half. scikit-learn's ``roc_auc_score`` where installed, else the same number from average ranks
    (the Mann-Whitney statistic).

    Parameters
    ----------
    scores : np.ndarray, shape (N,)
    positive : np.ndarray, shape (N,), bool
    use_sklearn : bool
        False: the rank statistic even where scikit-learn is installed.

    Returns
    -------
    float or None
        None where either class is empty (there is nothing to rank).

    Examples
    --------
    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    if use_sklearn and has_sklearn:
        return float(roc_auc_score(positive, scores))
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties get their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
