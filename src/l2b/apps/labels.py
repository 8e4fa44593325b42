"""Label issues from what a run learns: the noise estimated with the trusted set, a label-quality score
and flags (cleanlab on the same data, for comparison, is ``l2b.apps.label_compare``).

Reads only run folders: ``per_sample.csv`` (see ``l2b.runfiles``), ``train_probs.npy`` and, with a
trusted set, ``val_probs.npy`` / ``val_labels.npy``, the final model's probabilities of the training
and trusted sets that the trainer writes at the end of a run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import load_yaml, make_config
from ..errors import L2BError
from ..runfiles import PER_SAMPLE, next_free, read_table, write_table
from ..scores import auroc
from .label_noise import NoiseEstimate, estimate_noise

log = logging.getLogger(__name__)

__all__ = ["auroc", "label_quality", "estimate_noise", "NoiseEstimate", "find_label_issues", "evaluate_issues",
           "accuracy_warning", "label_issues_for_run", "LabelReport",
           "posterior_right", "DEFAULT_THRESHOLD"]

ISSUES = "label_issues"  # .csv (the ranked table) and .json (counts, rule, evaluation)
VAL_PROBS, VAL_LABELS = "val_probs.npy", "val_labels.npy"  # the final model on the trusted set (the trainer's _finish)
DEFAULT_THRESHOLD = 0.5  # flag label_quality below this where no trusted set gives a count
LOW_ACCURACY = 0.5  # accuracy_warning: fraction of the way from chance to a perfect model
NEAR_CHANCE = 0.1


# ---------------------------------------------------------------- the score

SCORED = ("prob_given", "agreement")  # the evidence label_quality averages where no trusted set was given


def label_quality(table: dict[str, np.ndarray], *, probs: np.ndarray | None = None,
                  estimate: NoiseEstimate | None = None) -> np.ndarray:
    """Label quality in [0, 1] per sample; lower = more likely a wrong label.

    With a noise estimate (a run with a trusted set), the posterior probability that the given
    label is right, from the final model's class probabilities and the estimated noise
    (:func:`posterior_right`). Under the symmetric noise model this orders the samples exactly as
    the model's probability of the given label does; under the full transition matrix it also knows
    which labels noise can produce at all (a label that no class is ever turned into is never wrong).

    Without one, the mean of two pieces of evidence, each in [0, 1]: the final model's probability
    of the given label (``prob_given``), and how often the pseudo-label agreed with the given label
    over the meta steps after warm-up (``1 - disagreement_rate``). A run without meta steps
    (``ce``) has no history: its score is ``prob_given`` alone.

    Parameters
    ----------
    table : dict of np.ndarray
        The per-sample table of a run.
    probs : np.ndarray, shape (N, K), optional
        The final model's class probabilities of the training samples (``train_probs.npy``).
    estimate : NoiseEstimate, optional
        Used with ``probs``.

    Returns
    -------
    np.ndarray, shape (N,)
    """
    if probs is not None and estimate is not None:
        return posterior_right(probs, table["given_label"], estimate.transition)
    parts = _evidence(table)
    stacked = np.stack([parts[k] for k in SCORED if k in parts])  # (P, N); prob_given is always there
    known = ~np.isnan(stacked)
    q = np.where(known, stacked, 0.0).sum(0) / np.maximum(known.sum(0), 1)
    return np.clip(q, 0.0, 1.0)


def posterior_right(probs: np.ndarray, given: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """P(given label right | x) = p_g T[g, g] / sum_i p_i T[i, g], reading ``probs`` as P(true class | x).

    Parameters
    ----------
    probs : np.ndarray, shape (N, K)
    given : np.ndarray, shape (N,), int
    transition : np.ndarray, shape (K, K)
        Rows: true class, columns: given class.

    Returns
    -------
    np.ndarray, shape (N,), in [0, 1]; 0 where the model gives no class that could produce the label.
    """
    joint = probs * transition[:, given].T  # (N, K): p_i(x) T[i, given]
    total = joint.sum(1)
    right = joint[np.arange(len(given)), given]
    return np.where(total > 0, right / np.maximum(total, 1e-300), 0.0)


def _evidence(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    a, b = table["alpha_mean"], table["beta_mean"]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(a + b > 0, a / (a + b), np.where(np.isnan(a + b), np.nan, 0.5))
    parts = {
        "prob_given": table["prob_given"].astype(np.float64),
        "agreement": 1.0 - table["disagreement_rate"],
        "alpha_share": share,
    }
    # a piece that no sample has (a CE run has no meta steps) would only add NaN
    return {k: v for k, v in parts.items() if not np.all(np.isnan(v))}


def noise_for_run(run_dir: str | Path, table: dict[str, np.ndarray]) -> NoiseEstimate | None:
    """The noise estimate of a run folder, or None where it has no trusted-set predictions."""
    run = Path(run_dir)
    if not (run / VAL_PROBS).is_file() or not (run / VAL_LABELS).is_file():
        return None
    val_probs, val_labels = np.load(run / VAL_PROBS), np.load(run / VAL_LABELS)
    if len(val_labels) == 0:
        return None
    return estimate_noise(table["given_label"], table["pred_label"], val_labels, val_probs.argmax(1),
                          num_classes=val_probs.shape[1])


# ---------------------------------------------------------------- flags

def find_label_issues(table: dict[str, np.ndarray], *, estimate: NoiseEstimate | None = None,
                      probs: np.ndarray | None = None, threshold: float | None = None,
                      classes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Rank the training samples by label quality (ascending: the likeliest wrong labels first) and flag some.

    Parameters
    ----------
    table : dict of np.ndarray
        The per-sample table of a run (:func:`read_table` of ``per_sample.csv``).
    estimate : NoiseEstimate, optional
        With an estimate (and no ``threshold``), the ``round(estimate.num_wrong)`` samples of
        lowest quality are flagged: as many as the trusted set says are wrong.
    probs : np.ndarray, shape (N, K), optional
        The final model's class probabilities of the training samples; with ``estimate``, the
        quality is the posterior probability of the given label (:func:`label_quality`).
    threshold : float, optional
        ``is_label_issue = label_quality < threshold`` instead. Without an estimate the default is
        0.5 (:data:`DEFAULT_THRESHOLD`): on average the evidence sides with another label.
    classes : list of str, optional
        Class names; adds ``given_name`` and ``suggested_name``.

    Returns
    -------
    dict of np.ndarray, each (N,)
        index, given_label, suggested_label (the final model's class), label_quality,
        is_label_issue, alpha_mean, beta_mean, disagreement_rate (+ path, class names).
    """
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise L2BError(f"--threshold must be in [0, 1], got {threshold}")
    q = label_quality(table, probs=probs, estimate=estimate)
    order = np.argsort(q, kind="stable")
    if threshold is None and estimate is not None:
        flagged = np.zeros(len(q), dtype=bool)
        flagged[order[: int(round(estimate.num_wrong))]] = True
    else:
        flagged = q < (DEFAULT_THRESHOLD if threshold is None else threshold)
    out = {
        "index": table["index"],
        "given_label": table["given_label"],
        "suggested_label": table["pred_label"],
        "label_quality": q,
        "is_label_issue": flagged,
        "alpha_mean": table["alpha_mean"],
        "beta_mean": table["beta_mean"],
        "disagreement_rate": table["disagreement_rate"],
    }
    if "path" in table:
        out["path"] = table["path"]
    if classes is not None:
        names = np.asarray(classes, dtype=object)
        out["given_name"] = names[table["given_label"]]
        out["suggested_name"] = names[table["pred_label"]]
    return {k: np.asarray(v)[order] for k, v in out.items()}


def accuracy_warning(accuracy: float, num_classes: int) -> str | None:
    """One line when the model is too weak on the trusted set for its ranking to be trusted, else None.

    Chance is 1 / K. Below :data:`NEAR_CHANCE` of the way from chance to a perfect model the
    ranking is close to random; below :data:`LOW_ACCURACY` of the way it, and the count flagged,
    are unreliable (on Fashion-MNIST at 40% noise, the runs this rule was made on scored 0.78-0.92
    of the way, and a model that never trained scores 0).
    """
    chance = 1.0 / num_classes
    above = (accuracy - chance) / (1.0 - chance)
    said = f"{100 * accuracy:.1f}% of the trusted set right, chance {100 * chance:.1f}%"
    if above < NEAR_CHANCE:
        return f"the model is near chance ({said}): its ranking of the labels is close to random"
    if above < LOW_ACCURACY:
        return f"the model is weak ({said}): the ranking and the number flagged are unreliable"
    return None


# ---------------------------------------------------------------- evaluation against the truth

def evaluate_issues(flagged: np.ndarray, wrongness: np.ndarray, flipped: np.ndarray) -> dict:
    """Precision, recall and F1 of ``flagged`` and AUROC of ``wrongness`` against the truly flipped labels.

    Parameters
    ----------
    flagged, flipped : np.ndarray, shape (N,), bool
    wrongness : np.ndarray, shape (N,)
        Higher = more likely wrong (e.g. ``1 - label_quality``).
    """
    flagged, flipped = np.asarray(flagged, dtype=bool), np.asarray(flipped, dtype=bool)
    tp = int(np.sum(flagged & flipped))
    precision = tp / int(flagged.sum()) if flagged.any() else None
    recall = tp / int(flipped.sum()) if flipped.any() else None
    f1 = 2 * tp / (int(flagged.sum()) + int(flipped.sum())) if (flagged.any() or flipped.any()) else None
    return {"flagged": int(flagged.sum()), "flipped": int(flipped.sum()), "precision": precision,
            "recall": recall, "f1": f1, "auroc": auroc(wrongness, flipped)}


# ---------------------------------------------------------------- a run folder

@dataclass
class LabelReport:
    """What ``l2b labels`` found in a run folder.

    Attributes
    ----------
    issues : dict of np.ndarray
        The ranked table written to ``label_issues.csv``.
    method : str
        The run's training method (``cfg.method``): the name of its row.
    rule : str
        How the number flagged was chosen, in words.
    estimate : NoiseEstimate or None
        The trusted set's noise estimate (None: the run has no trusted-set predictions).
    warning : str or None
        One line when the model is weak on the trusted set (:func:`accuracy_warning`).
    rows : list of dict
        One per method compared, the run's first: ``name``, ``flagged``, ``seconds`` (the run's
        training time; cleanlab's cross-validation, with ``cpu_seconds`` and the ``C`` or
        ``epochs`` it used) and, where the true labels are known, ``precision``, ``recall``,
        ``f1``, ``auroc``, ``flipped``.
    truth_known : bool
        Whether the run injected wrong labels whose true ones it knows; otherwise there is nothing
        to score against and the rows hold counts only.
    evidence_auroc : dict or None
        With the truth: the AUROC of each piece of evidence of ``per_sample.csv`` on its own
        (``prob_given``, ``agreement``, ``alpha_share``).
    files : tuple of Path
        The table and the JSON summary written (``label_issues.csv``, ``label_issues.json``, numbered
        where a previous pair exists).
    """

    issues: dict
    method: str
    rule: str
    estimate: NoiseEstimate | None
    warning: str | None
    rows: list[dict]
    truth_known: bool
    evidence_auroc: dict | None = None
    files: tuple[Path, Path] = ()


def label_issues_for_run(run_dir: str | Path, *, threshold: float | None = None,
                         compared: Callable[[Path, dict, np.ndarray | None], list[dict]] | None = None) -> LabelReport:
    """Rank and flag a run's training labels; write ``label_issues.csv`` and ``label_issues.json`` (numbered
    where they exist).

    Parameters
    ----------
    run_dir : path
        The folder of a finished ``l2b train`` run.
    threshold : float, optional
        Flag ``label_quality < threshold`` instead of the trusted set's estimated count.
    compared : callable, optional
        ``compared(run, table, flipped)`` -> rows of other methods on the same labels, appended after the
        run's own (``table``: ``per_sample.csv``; ``flipped``: (N,) bool or None, the labels known to be
        wrong); :func:`l2b.apps.label_compare.label_issues_with_cleanlab` passes cleanlab's.
    """
    run = Path(run_dir)
    if not (run / PER_SAMPLE).is_file():
        raise L2BError(f"{run / PER_SAMPLE} not found: give the folder of a finished `l2b train` run")
    table = read_table(run / PER_SAMPLE)
    summary = read_json(run / "summary.json")
    # the run's method names its row; a folder holding only the per-sample records says what it can
    cfg = make_config(load_yaml(run / "config.yaml"), source=str(run / "config.yaml")) \
        if (run / "config.yaml").is_file() else None
    method = cfg.method if cfg is not None else summary.get("method", "this run")
    classes = json.loads((run / "classes.json").read_text()) if (run / "classes.json").is_file() else None
    estimate = noise_for_run(run, table)
    probs = np.load(run / "train_probs.npy") if (run / "train_probs.npy").is_file() else None
    issues = find_label_issues(table, estimate=estimate, probs=probs, threshold=threshold, classes=classes)
    warning = accuracy_warning(estimate.clean_accuracy, estimate.transition.shape[0]) if estimate else None
    # the same ranking find_label_issues sorted by: issues[...] = table[...][order]
    order = np.argsort(label_quality(table, probs=probs, estimate=estimate), kind="stable")
    flipped = _flipped(table)
    row = {"name": method, "flagged": int(issues["is_label_issue"].sum()),
           "seconds": summary.get("train_seconds")}
    truth = flipped is not None
    if truth:
        row.update(evaluate_issues(issues["is_label_issue"], 1.0 - issues["label_quality"], flipped[order]))
    rows = [row]
    if compared is not None:
        rows += compared(run, table, flipped)
    evidence = {k: auroc(-np.nan_to_num(v, nan=0.5), flipped) for k, v in _evidence(table).items()} if truth else None
    report = LabelReport(issues, method, _rule(threshold, estimate), estimate, warning, rows, truth, evidence,
                         _new_outputs(run))
    write_table(issues, report.files[0])
    _write_report_json(report, report.files[1])
    return report


def _rule(threshold: float | None, estimate: NoiseEstimate | None) -> str:
    """How the number flagged was chosen, in words."""
    if threshold is not None:
        return f"label_quality < {threshold}"
    if estimate is not None:
        return (f"the {int(round(estimate.num_wrong))} of lowest label_quality: the number of wrong labels the "
                f"trusted set estimates, {100 * estimate.rate:.1f}%, {estimate.structure} noise")
    return (f"label_quality < {DEFAULT_THRESHOLD}: the run folder has no {VAL_PROBS} (no trusted set), "
            "so the number of wrong labels cannot be estimated")


def _flipped(table: dict) -> np.ndarray | None:
    """(N,) bool: the given label differs from the true one; None where there is nothing to score against.

    Without injected noise (``noise none``) the "true" labels are the given ones, and a user's own
    data has none: no evaluation at all rather than a table of zeros.
    """
    if "true_label" not in table:
        return None
    flipped = table["given_label"] != table["true_label"]
    return flipped if flipped.any() else None


def _new_outputs(run: Path) -> tuple[Path, Path]:
    """``label_issues.csv`` and ``.json`` in the run folder, numbered (``label_issues-2.csv``, ...) where
    either exists."""
    table = next_free(run / f"{ISSUES}.csv", ".json")
    return table, table.with_suffix(".json")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_report_json(report: LabelReport, path: Path) -> None:
    est = report.estimate
    out = {
        "method": report.method,
        "num_samples": int(len(report.issues["index"])),
        "rule": report.rule,
        "estimated_wrong": None if est is None else round(est.num_wrong, 1),
        "estimated_noise_rate": None if est is None else round(est.rate, 4),
        "noise_structure": None if est is None else est.structure,
        "clean_accuracy": None if est is None else est.clean_accuracy,
        "warning": report.warning,
        "rows": report.rows,
    }
    if report.evidence_auroc is not None:
        out["auroc_by_evidence"] = report.evidence_auroc
    path.write_text(json.dumps(out, indent=1))
