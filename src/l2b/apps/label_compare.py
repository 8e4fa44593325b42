"""cleanlab beside ``l2b labels``: its ``find_label_issues`` on the same images and given labels, with
out-of-sample probabilities from K-fold cross-validation (``l2b labels --compare-cleanlab``).

Unlike :mod:`l2b.apps.labels`, which reads run folders only, this module trains: the ``model``
cross-validation fits the run's architecture with the trainer's ``fit_ce``, and both need the run's
training images from its data set.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from ..config import load_yaml, make_config
from ..data.arrays import device_images
from ..data.sources import load_dataset
from ..errors import L2BError, check_choice
from ..models import create_model, predict_probs
from ..train import fit_ce
from ..train.setup import resolve_device
from .labels import LabelReport, evaluate_issues, label_issues_for_run, read_json

__all__ = ["label_issues_with_cleanlab", "cross_validated_probs", "cleanlab_issues", "CV_MODELS", "LOGREG_CS"]

LOGREG_CS = tuple(np.logspace(-4, 0, 9))  # the inverse regularisations cleanlab's logistic regression chooses from
LOGREG_MAX_ITER = 1000


CV_MODELS = {  # --cv-model name -> what the row calls it
    "logreg": "logistic regression",
    "model": "the run's model, plain CE",
}
CLEANLAB_INSTALL = "pip install 'l2b[cleanlab]'"


def require_cleanlab() -> None:
    """Raise :class:`L2BError` with the install command when cleanlab (or scikit-learn) is missing."""
    try:
        import cleanlab.filter  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        raise L2BError(f"--compare-cleanlab needs cleanlab and scikit-learn, which are not installed: "
                       f"{CLEANLAB_INSTALL}") from None


def cross_validated_probs(x, given: np.ndarray, *, num_classes: int, cv_model: str, folds: int, seed: int,
                          cfg=None, epochs: int | None = None, device: str | None = None,
                          mean: list[float] | None = None, std: list[float] | None = None) -> tuple[np.ndarray, dict]:
    """Out-of-sample class probabilities of every training sample by stratified K-fold cross-validation.

    Parameters
    ----------
    x : np.ndarray or ImageFiles, shape (N, C, H, W)
        The training images.
    given : np.ndarray, shape (N,), int
        Their given (possibly wrong) labels: the only labels the folds see.
    num_classes : int
    cv_model : {"logreg", "model"}
        ``logreg``: scikit-learn's ``LogisticRegression`` on the flattened pixels, standardised
        per fold, its inverse regularisation C picked from :data:`LOGREG_CS` by the
        cross-validated log-loss on the given labels (the truth is never used). ``model``:
        ``cfg.model`` trained from scratch with plain cross-entropy by the trainer's ``fit_ce``
        (the run's optimiser settings) for ``epochs`` epochs per fold.
    folds : int
    seed : int
        Seeds the folds and, for ``model``, each fold's initialisation.
    cfg : Config
        The run's configuration (``model`` only).
    epochs : int
        Epochs per fold (``model`` only).
    device : str, optional
        ``model`` only; default ``cfg.device``.
    mean, std : list of float
        Channel statistics the images are normalised with (``model`` only; the run's
        ``normalization.json``).

    Returns
    -------
    probs : np.ndarray, shape (N, K)
    details : dict
        What was chosen: ``C`` (logreg), ``epochs`` (model).
    """
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(given)
    if folds < 2 or counts[counts > 0].min() < folds:
        raise L2BError(f"--cv-folds {folds}: need 2 <= folds <= {counts[counts > 0].min()} (the rarest given class)")
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(given)), given))
    if cv_model == "logreg":
        return _cv_logreg(np.asarray(x.astype(np.float32)).reshape(len(given), -1), given, splits, num_classes)
    if cv_model == "model":
        probs = _cv_network(x, given, splits, num_classes, cfg=cfg, epochs=epochs, device=device, mean=mean, std=std)
        return probs, {"epochs": epochs}
    check_choice("--cv-model", cv_model, CV_MODELS)
    raise AssertionError("unreachable")


def _cv_logreg(flat: np.ndarray, given: np.ndarray, splits: list, num_classes: int) -> tuple[np.ndarray, dict]:
    """Out-of-fold probabilities (N, K) of the C in :data:`LOGREG_CS` with the lowest log-loss on the given labels.

    Regularisation decides how much of the noise a linear model on 784 pixels fits: on a
    Fashion-MNIST development run (3,000 images, 40% noise) sklearn's C = 1 gave cleanlab an AUROC
    of 0.83, C = 0.001 0.97. The held-out log-loss of the given labels finds the latter without the
    truth.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best, best_loss = None, np.inf
    for c in LOGREG_CS:
        probs = np.zeros((len(given), num_classes))
        for train_idx, held in splits:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=LOGREG_MAX_ITER))
            with warnings.catch_warnings():  # a weakly regularised fit may stop at max_iter: it then loses on log-loss
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(flat[train_idx], given[train_idx])
            probs[np.ix_(held, clf.classes_)] = clf.predict_proba(flat[held])
        loss = -np.mean(np.log(np.clip(probs[np.arange(len(given)), given], 1e-12, None)))
        if loss < best_loss:
            best, best_loss, best_c = probs, loss, float(c)
    return best, {"C": best_c}


def _cv_network(x, given: np.ndarray, splits: list, num_classes: int, *, cfg, epochs: int, device: str | None,
                mean: list[float], std: list[float]) -> np.ndarray:
    """The run's architecture trained with plain CE on each fold's training part (``fit_ce``)."""
    import torch

    dev = resolve_device(device or cfg.device)
    mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    labels = torch.as_tensor(given, dtype=torch.int64)
    probs = np.zeros((len(given), num_classes))
    for f, (train_idx, held) in enumerate(splits):
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1000 * (f + 1))  # each fold its own initialisation
            net = create_model(cfg.model, num_classes=num_classes, in_channels=x.shape[1],
                               pretrained=cfg.pretrained or None).to(dev)
            part = device_images(x[train_idx], dev, mean, std, workers=cfg.workers)
            fit_ce(net, part, labels[train_idx].to(dev), cfg=cfg, epochs=epochs)
            held_out = device_images(x[held], dev, mean, std, workers=cfg.workers)
            probs[held] = predict_probs(net, held_out, cfg.eval_batch_size).cpu().numpy()
    return probs


def cleanlab_issues(probs: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's flags (``find_label_issues``, its defaults) and quality (``get_label_quality_scores``).

    Returns
    -------
    flagged : np.ndarray, shape (N,), bool
    quality : np.ndarray, shape (N,)
        Lower = more likely wrong (cleanlab's self-confidence).
    """
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    flagged = np.asarray(cl_find(given, probs), dtype=bool)
    return flagged, np.asarray(get_label_quality_scores(given, probs), dtype=np.float64)


def label_issues_with_cleanlab(run_dir: str | Path, *, compare: tuple[str, ...], threshold: float | None = None,
                               folds: int = 5, cv_epochs: int | None = None, device: str | None = None) -> LabelReport:
    """:func:`l2b.apps.labels.label_issues_for_run`, with a row of cleanlab's per model in ``compare``.

    Parameters
    ----------
    run_dir : path
        The folder of a finished ``l2b train`` run (its ``config.yaml`` names the data set).
    compare : tuple of str
        :data:`CV_MODELS` to run cleanlab with (out-of-sample probabilities by ``folds``-fold
        cross-validation on the same images and given labels).
    threshold : float, optional
        As in ``label_issues_for_run``.
    cv_epochs : int, optional
        Epochs per fold of ``compare=("model",)``; default the run's epochs.
    device : str, optional
        Device of the ``model`` folds; default the run's.

    Examples
    --------
    >>> report = label_issues_with_cleanlab("runs/fmnist", compare=("logreg",))  # doctest: +SKIP
    >>> [row["name"] for row in report.rows]  # doctest: +SKIP
    ['l2b', 'cleanlab, 5-fold logreg']
    """
    require_cleanlab()  # before anything is computed
    for name in compare:
        check_choice("--cv-model", name, CV_MODELS)
    rows = partial(cleanlab_rows, compare=compare, folds=folds, cv_epochs=cv_epochs, device=device)
    return label_issues_for_run(run_dir, threshold=threshold, compared=rows)


def cleanlab_rows(run: Path, table: dict, flipped: np.ndarray | None, *, compare: tuple[str, ...], folds: int,
                  cv_epochs: int | None, device: str | None) -> list[dict]:
    """cleanlab's rows: each model's K-fold probabilities, its flags, and the seconds they took."""
    if not (run / "config.yaml").is_file():
        raise L2BError(f"{run / 'config.yaml'} not found: --compare-cleanlab needs the run's config to find its images")
    cfg = make_config(load_yaml(run / "config.yaml"), source=str(run / "config.yaml"))
    given = table["given_label"]
    x = _training_images(run, cfg, table)
    normalization = read_json(run / "normalization.json")
    num_classes = len(json.loads((run / "classes.json").read_text()))
    rows = []
    for name in compare:
        t0, cpu0 = time.perf_counter(), time.process_time()
        probs, details = cross_validated_probs(x, given, num_classes=num_classes, cv_model=name, folds=folds,
                                               seed=cfg.seed, cfg=cfg, epochs=cv_epochs or cfg.epochs, device=device,
                                               mean=normalization["mean"], std=normalization["std"])
        flagged, quality = cleanlab_issues(probs, given)
        what = f"{cfg.model} CE" if name == "model" else "logreg"
        row = {"name": f"cleanlab, {folds}-fold {what}", "flagged": int(flagged.sum()),
               "seconds": round(time.perf_counter() - t0, 2),
               "cpu_seconds": round(time.process_time() - cpu0, 2), **details}
        if flipped is not None:
            row.update(evaluate_issues(flagged, 1.0 - quality, flipped))
        rows.append(row)
    return rows


def _training_images(run: Path, cfg, table: dict):
    """The run's training images (N, C, H, W), in the order of ``per_sample.csv``, from its data set.

    A run trained on data given in memory (``train(cfg, data=...)``) names a data set in its config
    that it never saw; the image shape and, where known, the true labels must match, or nothing is compared.
    """
    indices = np.load(run / "train_indices.npy")
    if len(indices) != len(table["given_label"]) or np.any(indices < 0):
        raise L2BError(f"{run}: its training images are not all in the data set's training split "
                       f"(a {cfg.method} run with a given clean split), so cleanlab cannot be run on them")
    data = load_dataset(cfg)
    shape = read_json(run / "normalization.json").get("input_shape")
    if (indices.max() >= len(data.y_train) or (shape and list(data.x_train.shape[1:]) != shape)
            or ("true_label" in table and not np.array_equal(data.y_train[indices], table["true_label"]))):
        raise L2BError(f"{run}: the data set in its config.yaml ({cfg.dataset}) is not the one the run trained on "
                       "(a run trained on arrays given in memory?); cleanlab cannot be run on its images")
    return data.x_train[indices]
