"""The run folder: created before any data is read, filled at the start, every epoch and at the end."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import Config, save_yaml
from ..data.arrays import ImageData
from ..data.prepare import TrainData
from ..errors import L2BError

__all__ = ["new_run_dir", "write_run_files", "write_metrics", "keep_history", "summarize", "weight_means",
           "accumulate_weight_stats", "weight_aurocs", "auroc", "AUROC_SCORES"]

try:  # optional: the maintained implementation where installed
    from sklearn.metrics import roc_auc_score

    has_sklearn = True
except ImportError:  # pragma: no cover - exercised by forcing the fallback in the tests
    has_sklearn = False

# metrics.jsonl key -> the per-sample score it ranks (a, b: the sample's mean alpha and beta over the epoch)
AUROC_SCORES = {"auroc_alpha": lambda a, b: a, "auroc_beta": lambda a, b: b, "auroc_alpha_plus_beta": lambda a, b: a + b,
                "auroc_beta_minus_alpha": lambda a, b: b - a}


def new_run_dir(cfg: Config) -> Path:
    """The run folder: ``cfg.out`` if given (it must not exist), else runs/<time>-<method>[-k]."""
    if cfg.out:
        out = Path(cfg.out)
        if out.exists():
            raise L2BError(f"output folder {out} already exists; choose another --out (nothing was overwritten)")
    else:
        stem = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.replace('+', '-')}"
        out, k = stem, 1
        while out.exists():
            k += 1
            out = stem.with_name(f"{stem.name}-{k}")
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise L2BError(f"cannot create output folder {out}: {exc.strerror}") from None
    return out


def write_run_files(out: Path, cfg: Config, td: TrainData, data: ImageData) -> None:
    """What a fresh run folder holds before the first step: config, noise, labels, the data record."""
    save_yaml(cfg, out / "config.yaml")
    (out / "noise.json").write_text(json.dumps(td.noise_info, indent=1))
    np.save(out / "noisy_labels.npy", td.y_observed.cpu().numpy())
    for name, text in data.files.items():  # e.g. the seeded ISIC2019 split
        (out / name).write_text(text)
    save_data_record(out, td, data)


def save_data_record(out: Path, td: TrainData, data: ImageData) -> None:
    """What `l2b labels`, `l2b predict` and `l2b eval` need besides the checkpoint."""
    np.save(out / "train_indices.npy", td.indices)
    if td.y_true is not None:
        np.save(out / "true_labels.npy", td.y_true)
    (out / "classes.json").write_text(json.dumps(list(data.classes)))
    (out / "normalization.json").write_text(json.dumps({
        "mean": td.mean.tolist(), "std": td.std.tolist(), "input_shape": list(data.x_train.shape[1:]),
        "input_dtype": str(data.x_train.dtype), "scale": 255.0 if data.x_train.dtype == np.uint8 else 1.0,
    }, indent=1))


def write_metrics(out: Path, metrics: list[dict]) -> None:
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, out / "metrics.jsonl")


def keep_history(out: Path, epoch: int, keep: int) -> None:
    """Besides checkpoint.pt (the latest), keep copies of the last ``keep - 1`` epoch checkpoints."""
    if keep <= 1:
        return
    shutil.copyfile(out / "checkpoint.pt", out / f"checkpoint-epoch{epoch:04d}.pt")
    history = sorted(out.glob("checkpoint-epoch*.pt"))
    for old in history[: max(len(history) - (keep - 1), 0)]:
        old.unlink()


def accumulate_weight_stats(stats: Tensor, flipped: Tensor, alpha: Tensor, beta: Tensor) -> None:
    """stats (3, 2), rows: alpha sum, beta sum, count; columns: clean, flipped samples."""
    n = len(alpha)
    for col, mask in enumerate((~flipped, flipped)):
        stats[0, col] += alpha[mask].double().sum() * n
        stats[1, col] += beta[mask].double().sum() * n
        stats[2, col] += mask.sum()


def weight_means(stats: Tensor) -> dict:
    s = stats.cpu().tolist()
    mean = lambda row, col: (s[row][col] / s[2][col]) if s[2][col] else None  # noqa: E731
    return {"alpha_clean": mean(0, 0), "alpha_flipped": mean(0, 1), "beta_clean": mean(1, 0), "beta_flipped": mean(1, 1)}


def auroc(scores: np.ndarray, positive: np.ndarray, *, use_sklearn: bool = True) -> float | None:
    """Area under the ROC curve of ``scores`` (N,) for the positive class ``positive`` (N,) bool.

    The probability that a random positive scores higher than a random negative (ties count one
    half); None where either class is empty. sklearn's ``roc_auc_score`` where installed, else the
    same number from average ranks (Mann-Whitney U).
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


def weight_aurocs(epoch_weights: Tensor | None, flipped: Tensor) -> dict:
    """How well the epoch's weights tell flipped samples from clean ones: an AUROC per score.

    Parameters
    ----------
    epoch_weights : Tensor, shape (3, N), or None
        Rows: alpha sum, beta sum, steps counted, per training sample over the epoch's meta steps
        (``LoopState.epoch_weights``). Samples not seen this epoch are left out.
    flipped : Tensor, shape (N,), bool
        True where the observed label differs from the true one.

    Returns
    -------
    dict
        ``auroc_alpha``, ``auroc_beta``, ``auroc_alpha_plus_beta``, ``auroc_beta_minus_alpha``: the
        AUROC of each sample's mean alpha, mean beta, their sum and beta - alpha as a score for
        "flipped" (higher = more likely flipped). 0.5 = no signal; a weighting that trusts clean
        labels has ``auroc_alpha`` well below 0.5 and ``auroc_beta_minus_alpha`` well above.
        None where the epoch has no meta step or one of the two groups is empty.
    """
    if epoch_weights is None:
        return {key: None for key in AUROC_SCORES}
    w = epoch_weights.cpu()
    seen = w[2] > 0
    a, b = (w[0][seen] / w[2][seen]).numpy(), (w[1][seen] / w[2][seen]).numpy()
    positive = flipped.cpu()[seen].numpy()
    return {key: auroc(score(a, b), positive) for key, score in AUROC_SCORES.items()}


def summarize(cfg: Config, metrics: list[dict], noise_info: dict, train_seconds: float) -> dict:
    """The three accuracies every run reports: last epoch, at the best clean-validation epoch (honest model
    selection), and the max over epochs (selected on the test set, as the published code reports)."""
    scored = [m for m in metrics if m["val_acc"] is not None]  # empty without a clean set
    best = max(scored, key=lambda m: (m["val_acc"], -m["epoch"])) if scored else {"test_acc": None, "epoch": None}
    tests = [m["test_acc"] for m in metrics if m["test_acc"] is not None]
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "noise": noise_info["noise"],
        "noise_rate": cfg.noise_rate,
        "noise_rate_actual": noise_info["noise_rate_actual"],
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "test_acc_last": metrics[-1]["test_acc"],
        "test_acc_best_val": best["test_acc"],
        "best_val_epoch": best["epoch"],
        "test_acc_max": max(tests) if tests else None,
        "train_seconds": round(train_seconds, 2),
    }
