"""How many of a run's training labels are wrong, from the trusted set: the noise transition matrix and
class prior fitted by EM to the (given, predicted) pairs, with the model's confusion measured on the
trusted set held fixed (Dawid and Skene 1979, one annotator's confusion known).

``l2b labels`` flags that many (:mod:`l2b.apps.labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import L2BError, check_choice

__all__ = ["NOISE_STRUCTURES", "NoiseEstimate", "estimate_noise"]


NOISE_STRUCTURES = ("symmetric", "full")


@dataclass(frozen=True)
class NoiseEstimate:
    """The label noise of a training set, estimated with a trusted set (see :func:`estimate_noise`).

    Attributes
    ----------
    transition : np.ndarray, shape (K, K)
        Estimated T[i, j] = P(given j | true i); rows: true class, columns: given class, rows sum to
        one (the convention of ``l2b.data.noise``).
    prior : np.ndarray, shape (K,)
        Estimated share of each true class in the training set.
    p_wrong : np.ndarray, shape (N,)
        Posterior probability that each training sample's given label is wrong, from its pair
        (given label, predicted class) alone; higher = more likely wrong.
    clean_accuracy : float
        The model's accuracy on the trusted set, in [0, 1].
    structure : str
        The noise model chosen: ``symmetric`` (one rate, wrong labels uniform over the other
        classes) or ``full`` (any transition matrix).
    bic : dict
        Bayesian information criterion of each noise model fitted (lower = chosen).
    """

    transition: np.ndarray
    prior: np.ndarray
    p_wrong: np.ndarray
    clean_accuracy: float
    structure: str
    bic: dict

    @property
    def num_wrong(self) -> float:
        """Expected number of wrong labels in the training set."""
        return float(self.p_wrong.sum())

    @property
    def rate(self) -> float:
        """Expected share of wrong labels in the training set."""
        return float(self.p_wrong.mean()) if len(self.p_wrong) else 0.0


def estimate_noise(given: np.ndarray, predicted: np.ndarray, trusted_labels: np.ndarray,
                   trusted_predicted: np.ndarray, *, num_classes: int, structure: str = "auto",
                   max_iter: int = 2000, tol: float = 1e-10) -> NoiseEstimate:
    """Estimate the label noise of a training set with a model's predictions and a trusted set.

    Model: a training sample has an unknown true class y ~ ``prior``, a given label ~ T[y, :] and a
    predicted class ~ A[y, :], the two independent given y. A, the model's confusion, is counted on
    the trusted set, where y is known (out of sample: the model never trained on those labels). T
    and the prior are fitted to the counts of (given, predicted) pairs over the training set by EM
    (maximum likelihood; Dawid and Skene 1979 with one annotator of known confusion). Where A is
    invertible the K^2 - 1 pair frequencies identify all (K - 1) + K (K - 1) unknowns. This is the
    role GLC (Hendrycks et al. 2018) gives the trusted set, turned around: GLC counts T from the
    trusted set's predictions; here the trusted set calibrates the predictions, and T follows from
    the training labels.

    Two noise models are fitted, ``symmetric`` (T = (1 - r) I + r / (K - 1) off the diagonal: one
    parameter) and ``full`` (K (K - 1) parameters), and the one of lower BIC is kept: a full matrix
    fitted to symmetric noise spreads the trusted set's sampling error (about 100 images per class)
    over its diagonal, which then reorders the samples from class to class for nothing.

    The independence fails where the model has memorised given labels: its predictions on training
    samples then agree with wrong labels more than A says, and the estimate falls short.

    Parameters
    ----------
    given : np.ndarray, shape (N,), int
        The training labels as given (possibly wrong).
    predicted : np.ndarray, shape (N,), int
        The model's class for each training sample.
    trusted_labels, trusted_predicted : np.ndarray, shape (M,), int
        True labels of the trusted set and the model's class for each.
    num_classes : int
    structure : {"auto", "symmetric", "full"}, default="auto"
        ``auto``: the noise model of lower BIC.
    max_iter : int, default=2000
    tol : float, default=1e-10
        EM stops when no entry of T moves by more than this.

    Returns
    -------
    NoiseEstimate

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> true = rng.integers(0, 4, 4000)
    >>> given = np.where(rng.random(4000) < 0.3, (true + 1) % 4, true)  # 30% to the next class
    >>> model = lambda y: np.where(rng.random(len(y)) < 0.9, y, rng.integers(0, 4, len(y)))  # 92.5% right
    >>> trusted = rng.integers(0, 4, 1000)
    >>> est = estimate_noise(given, model(true), trusted, model(trusted), num_classes=4)
    >>> print(f"{est.structure}: estimated {est.rate:.3f}, realised {np.mean(given != true):.3f}")
    full: estimated 0.295, realised 0.294
    """
    k = num_classes
    for name, y in (("given", given), ("predicted", predicted), ("trusted_labels", trusted_labels),
                    ("trusted_predicted", trusted_predicted)):
        if len(y) and (np.min(y) < 0 or np.max(y) >= k):
            raise L2BError(f"{name}: class indices must lie in [0, {k})")
    if len(given) != len(predicted) or len(trusted_labels) != len(trusted_predicted):
        raise L2BError("given/predicted and trusted_labels/trusted_predicted must have equal lengths")
    if len(trusted_labels) == 0:
        raise L2BError("the noise estimate needs a trusted set; this one is empty")
    if structure != "auto":
        check_choice("noise structure", structure, NOISE_STRUCTURES)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (trusted_labels, trusted_predicted), 1.0)
    # a Dirichlet prior of total mass 1 per row: a class the trusted set misses keeps a uniform row
    a = (confusion + 1.0 / k) / (confusion.sum(1, keepdims=True) + 1.0)  # (K, K): true -> predicted
    pairs = np.zeros((k, k))
    np.add.at(pairs, (given, predicted), 1.0)  # (K, K): given -> predicted
    fits, bic = {}, {}
    for s in (NOISE_STRUCTURES if structure == "auto" else (structure,)):
        fits[s] = _fit_noise(pairs, a, s, max_iter, tol)
        params = (k - 1) + (1 if s == "symmetric" else k * (k - 1))
        bic[s] = -2.0 * fits[s][2] + params * np.log(max(len(given), 1))
    chosen = min(bic, key=bic.get)
    t, prior, _ = fits[chosen]
    post = _true_class_posterior(prior, t, a)
    p_wrong = 1.0 - post[given, given, predicted]
    accuracy = float(np.mean(trusted_labels == trusted_predicted))
    return NoiseEstimate(transition=t, prior=prior, p_wrong=p_wrong, clean_accuracy=accuracy, structure=chosen,
                         bic={s: float(v) for s, v in bic.items()})


def _fit_noise(pairs: np.ndarray, a: np.ndarray, structure: str, max_iter: int,
               tol: float) -> tuple[np.ndarray, np.ndarray, float]:
    """EM for T (K, K) and the prior (K,) given pair counts (K given, K predicted) and A; also the log-likelihood."""
    k = len(a)
    prior = np.full(k, 1.0 / k)
    t = 0.5 * np.eye(k) + 0.5 / k
    for _ in range(max_iter):
        post = _true_class_posterior(prior, t, a)  # (K true, K given, K predicted)
        mass = np.einsum("jk,ijk->ij", pairs, post)  # (K, K): expected counts of (true, given)
        prior = mass.sum(1) / max(pairs.sum(), 1.0)
        if structure == "symmetric":
            r = 1.0 - np.trace(mass) / max(mass.sum(), 1e-300)
            new_t = (1.0 - r) * np.eye(k) + r / max(k - 1, 1) * (1.0 - np.eye(k))
        else:
            rows = mass.sum(1, keepdims=True)
            new_t = np.where(rows > 0, mass / np.maximum(rows, 1e-300), np.eye(k))
        done = np.max(np.abs(new_t - t)) < tol
        t = new_t
        if done:
            break
    cells = np.einsum("i,ij,ik->jk", prior, t, a)  # (K given, K predicted): model's pair probabilities
    loglik = float(np.sum(pairs * np.log(np.maximum(cells, 1e-300))))
    return t, prior, loglik


def _true_class_posterior(prior: np.ndarray, t: np.ndarray, a: np.ndarray) -> np.ndarray:
    """P(true i | given j, predicted k) as (K, K, K) indexed [i, j, k]."""
    joint = prior[:, None, None] * t[:, :, None] * a[:, None, :]
    return joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)
