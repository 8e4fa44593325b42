"""The per-sample table of a run folder (``per_sample.csv``): how it is built, written and read.

The trainer writes it at the end of a run; ``l2b labels``, ``l2b report`` and the estimator read it.
Columns:

``index``               the sample's index in the data set's training split
``given_label``         the observed label the model was trained on
``true_label``          the true label (only where it is known, e.g. synthetic noise)
``alpha_mean``          mean alpha over the meta steps after warm-up, times the batch size
``beta_mean``           the same for beta (under ``sum`` an average sample has alpha + beta = 1)
``disagreement_rate``   share of those steps whose pseudo-label differed from the given label
``meta_steps``          how many meta steps saw the sample
``last_pseudo``, ``last_prob``   the last pseudo-label and its (train-mode) probability
``pred_label``, ``pred_prob``    the final model's class and probability (eval mode)
``prob_given``          the final model's probability of the given label
``path``                the sample's file, for data read from files
"""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import numpy as np

from .errors import L2BError

try:
    import pyarrow  # noqa: F401

    has_pyarrow = True
except ImportError:
    has_pyarrow = False

__all__ = ["PER_SAMPLE", "per_sample_table", "write_table", "read_table", "claim_output", "next_free"]


PER_SAMPLE = "per_sample.csv"


def per_sample_table(records: dict, given: np.ndarray, indices: np.ndarray, probs: np.ndarray,
                     true: np.ndarray | None = None, paths: list[str] | None = None) -> dict[str, np.ndarray]:
    """The per-sample table of a run.

    Parameters
    ----------
    records : dict
        ``SampleRecords.state_dict()`` of the trainer: alpha_sum, beta_sum, count, disagree,
        last_pseudo, last_prob, each (N,).
    given : np.ndarray, shape (N,)
        Observed labels.
    indices : np.ndarray, shape (N,)
        Index of each sample in the data set's training split (-1: not from it).
    probs : np.ndarray, shape (N, K)
        The final model's class probabilities of the training samples (eval mode).
    true : np.ndarray, shape (N,), optional
    paths : list of str, optional
    """
    rec = {k: np.asarray(v.cpu() if hasattr(v, "cpu") else v) for k, v in records.items()}
    count = rec["count"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        table = {
            "index": np.asarray(indices, dtype=np.int64),
            "given_label": np.asarray(given, dtype=np.int64),
        }
        if true is not None:
            table["true_label"] = np.asarray(true, dtype=np.int64)
        table.update({
            "alpha_mean": np.where(count > 0, rec["alpha_sum"] / count, np.nan),
            "beta_mean": np.where(count > 0, rec["beta_sum"] / count, np.nan),
            "disagreement_rate": np.where(count > 0, rec["disagree"] / count, np.nan),
            "meta_steps": rec["count"].astype(np.int64),
            "last_pseudo": rec["last_pseudo"].astype(np.int64),
            "last_prob": np.where(count > 0, rec["last_prob"], np.nan),
            "pred_label": probs.argmax(1).astype(np.int64),
            "pred_prob": probs.max(1),
            "prob_given": probs[np.arange(len(given)), given],
        })
    if paths is not None:
        table["path"] = np.asarray(paths, dtype=object)
    return table


def claim_output(path: str | Path, *, overwrite: bool, flag: str = "--overwrite") -> Path:
    """An output file a command is about to write: an existing one is refused unless ``overwrite``.

    Checked before any work, so a refused command has written nothing (``l2b predict``, ``eval``,
    ``labels``, ``report``).
    """
    path = Path(path)
    if path.is_dir():
        raise L2BError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise L2BError(f"{path} already exists; pass {flag} to replace it (nothing was written)")
    if not path.parent.is_dir():
        raise L2BError(f"folder {path.parent} does not exist")
    return path


def next_free(path: str | Path, *companions: str) -> Path:
    """``path``, or the first of ``stem-2.ext``, ``stem-3.ext``, ... that is free, with the files of the same
    stem and the suffixes ``companions`` (e.g. ``".json"`` beside a ``.csv``) free too: an output someone
    has been working through is never overwritten."""
    path = Path(path)
    candidate, k = path, 1
    while any(candidate.with_suffix(s).exists() for s in (path.suffix, *companions)):
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


def write_table(table: dict[str, np.ndarray], path: Path) -> None:
    """CSV with a header; floats with 6 significant digits, NaN as ``nan``. Also parquet when pyarrow is installed."""
    path = Path(path)
    cols = list(table)
    n = len(next(iter(table.values()))) if table else 0

    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.6g}"
        return str(v.item() if hasattr(v, "item") else v)

    tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: never a half-written table
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for i in range(n):
                w.writerow([fmt(table[c][i]) for c in cols])
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise L2BError(f"cannot write {path} ({exc.strerror or exc})") from None
    if has_pyarrow and path.suffix == ".csv":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: list(v) if v.dtype == object else v for c, v in table.items()}),
                       path.with_suffix(".parquet"))


_INT_COLS = {"index", "given_label", "true_label", "meta_steps", "last_pseudo", "pred_label", "suggested_label"}


_STR_COLS = {"path", "given_name", "suggested_name", "predicted_name"}


def read_table(path: Path) -> dict[str, np.ndarray]:
    """Read a table written by :func:`write_table` (or a gzip of it, ``*.gz``) back into typed columns."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise L2BError(f"cannot read {path}: {exc.strerror}") from None
    if not rows:
        raise L2BError(f"{path} is empty")
    header, body = rows[0], rows[1:]
    table = {}
    for j, name in enumerate(header):
        col = [r[j] for r in body]
        if name in _STR_COLS:
            table[name] = np.asarray(col, dtype=object)
        elif name == "is_label_issue":
            table[name] = np.asarray([v == "True" for v in col], dtype=bool)
        else:
            try:
                table[name] = np.asarray(col, dtype=np.int64 if name in _INT_COLS else np.float64)
            except ValueError:
                raise L2BError(f"{path}: column {name!r} holds a value that is not a number") from None
    return table
