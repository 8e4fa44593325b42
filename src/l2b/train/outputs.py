"""The run folder: created before any data is read, filled at the start, every epoch and at the end."""

from __future__ import annotations

import csv
import io
import json
import platform
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
from ..scores import auroc
from ..version import __version__
from .checkpoint import write_atomically

__all__ = ["check_out", "new_run_dir", "lock_run_dir", "clear_run_dir", "write_run_files", "write_metrics",
           "keep_history", "summarize", "weight_means", "accumulate_weight_stats", "run_plan", "environment",
           "record_environment", "resolve_logs", "EpochLogs", "accuracy_counts", "train_accuracies",
           "accumulate_weight_hist", "WEIGHT_BIN_EDGES", "weight_aurocs",
           "AUROC_SCORES"]

# metrics.jsonl key -> the per-sample score it ranks (a, b: the sample's mean alpha and beta over the epoch)
AUROC_SCORES = {"auroc_alpha": lambda a, b: a, "auroc_beta": lambda a, b: b, "auroc_alpha_plus_beta": lambda a, b: a + b,
                "auroc_beta_minus_alpha": lambda a, b: b - a}


LOCK = ".lock"  # flock'ed by the one process writing the folder


def check_out(cfg: Config) -> Path | None:
    """Before any data is read: ``cfg.out`` must not exist, or be an empty folder; None = a fresh default name."""
    if not cfg.out:
        return None
    out = Path(cfg.out)
    if out.exists() and not (out.is_dir() and not [p for p in out.iterdir() if p.name != LOCK]):
        raise L2BError(f"output folder {out} already exists; choose another --out (nothing was overwritten)")
    return out


def new_run_dir(cfg: Config) -> tuple[Path, bool]:
    """The run folder: ``cfg.out`` if given (absent or empty), else runs/<time>-<method>[-k].

    Returns the folder and whether this call created it (a failed start removes only what it created).
    """
    out = check_out(cfg)
    if out is None:
        stem = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.replace('+', '-')}"
        out, k = stem, 1
        while out.exists():
            k += 1
            out = stem.with_name(f"{stem.name}-{k}")
    elif out.is_dir():
        return out, False
    try:
        out.mkdir(parents=True)
    except FileExistsError:  # another process made it between the check and now
        raise L2BError(f"output folder {out} already exists; choose another --out (nothing was overwritten)") from None
    except OSError as exc:
        raise L2BError(f"cannot create output folder {out}: {exc.strerror}") from None
    return out, True


def lock_run_dir(out: Path):
    """Take the run folder's write lock (``fcntl.flock`` on ``out/.lock``) or fail with one line.

    Returns the open lock file: the lock lasts until it is closed (or the process ends, even by kill -9).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return None
    try:
        fh = open(out / LOCK, "a+")
    except OSError as exc:
        raise L2BError(f"cannot open the lock file {out / LOCK} ({exc.strerror})") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise L2BError(f"run folder {out} is in use by another l2b process (train or --resume); wait for it to "
                       "finish or stop it first") from None
    return fh


def clear_run_dir(out: Path, created: bool) -> None:
    """Undo a failed start: remove the folder this run created, or empty the (empty) one it was given."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_run_files(out: Path, cfg: Config, td: TrainData, data: ImageData, env: dict) -> None:
    """What a fresh run folder holds before the first step: config (its first line names the versions
    and the device of ``env``, :func:`environment`), noise, labels, the data record."""
    save_yaml(cfg, out / "config.yaml", header=f"l2b {env['l2b']}, torch {env['torch']}, device {env['device']} "
                                               f"({env['device_name']}); run.json has the details")
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
    text = "".join(json.dumps(m) + "\n" for m in metrics).encode()
    write_atomically(out / "metrics.jsonl", lambda fh: fh.write(text))


def keep_history(out: Path, epoch: int, keep: int) -> None:
    """Besides checkpoint.pt (the latest), keep copies of the last ``keep - 1`` epoch checkpoints.

    Each copy is written atomically (a full disk leaves no torn ``checkpoint-epoch*.pt``)."""
    if keep <= 1:
        return
    with open(out / "checkpoint.pt", "rb") as src:
        write_atomically(out / f"checkpoint-epoch{epoch:04d}.pt", lambda fh: shutil.copyfileobj(src, fh))
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


def summarize(cfg: Config, metrics: list[dict], noise_info: dict, train_seconds: float,
              best_val_test: float | None = None, fits_clean_set: bool = False) -> dict:
    """The three accuracies every run reports: last epoch, at the best clean-validation epoch (honest model
    selection), and the max over epochs (selected on the test set, as the published code reports; only
    with a test pass every epoch, ``test_every`` 1). ``best_val_test``: best.pt's test accuracy, where the
    best epoch's line has none. ``fits_clean_set``: the method trains on the clean images (GLC,
    ``ce+clean``), so the best clean-validation epoch selects nothing; recorded as ``val_is_train``."""
    scored = [m for m in metrics if m["val_acc"] is not None]  # empty without a clean set
    best = max(scored, key=lambda m: (m["val_acc"], -m["epoch"])) if scored else {"test_acc": None, "epoch": None}
    tests = [m["test_acc"] for m in metrics if m["test_acc"] is not None]
    every_epoch = len(tests) == len(metrics)
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "noise": noise_info["noise"],
        "noise_rate": noise_info["noise_rate"],
        "noise_rate_actual": noise_info["noise_rate_actual"],
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "test_acc_last": metrics[-1]["test_acc"],
        "test_acc_best_val": best["test_acc"] if best["test_acc"] is not None else best_val_test,
        "best_val_epoch": best["epoch"],
        "test_acc_max": max(tests) if tests and every_epoch else None,
        "val_is_train": fits_clean_set,
        "train_seconds": round(train_seconds, 2),
    }


def run_plan(cfg: Config, td: TrainData, *, resumed_at: int | None = None) -> str:
    """What the run is about to do, printed before the first step: data, splits, trusted set, noise, method."""
    info = td.noise_info
    if info["noise"] == "given" or info["noise"].startswith("file:"):
        noise = f"the given noisy labels ({info['noise']}), no synthetic noise"
    elif info["noise"] == "none":
        noise = "the labels as given, no synthetic noise"
    else:
        noise = f"synthetic {info['noise']} noise at {100 * info['noise_rate']:g}%"
    meta = " (meta set: pseudo, picked from the training set)" if cfg.meta_set == "pseudo" else ""
    tests = "every epoch" if cfg.test_every == 1 else (f"every {cfg.test_every} epochs" if cfg.test_every
                                                        else "at the end (last and best clean-validation model)")
    lines = [
        f"l2b plan: {cfg.method}{meta} on {cfg.dataset}, {cfg.epochs} epochs, model {cfg.model}, seed {cfg.seed}",
        f"  images: train {info['num_train']}, trusted {info['num_clean']}, test {len(td.y_test)}",
        f"  trusted set: {info['trusted']}",
        f"  labels: {noise}",
        f"  test set evaluated {tests}",
    ]
    if resumed_at is not None:
        lines.append(f"  resuming after epoch {resumed_at}")
    return "\n".join(lines)


def environment(device: torch.device, world_size: int) -> dict:
    """What ran a run: the l2b, torch and Python versions, the device and the number of processes."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"l2b": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "device_name": name, "world_size": world_size}


def record_environment(out: Path, env: dict, logs: tuple[str, ...], *, resumed_at: int | None = None) -> None:
    """run.json: the environment of the run's start, and one entry per resume (a resume may run elsewhere)."""
    path = out / "run.json"
    now = datetime.now().isoformat(timespec="seconds")
    if resumed_at is None or not path.is_file():
        record = {**env, "log": list(logs), "started": now, "resumes": []}
    else:
        record = json.loads(path.read_text())
        record.setdefault("resumes", []).append({**env, "log": list(logs), "at_epoch": resumed_at, "started": now})
    text = json.dumps(record, indent=1).encode()
    write_atomically(path, lambda fh: fh.write(text))


# ---- per-epoch training accuracy, from the logits of each step's real forward (no extra pass)

def accuracy_counts(pred: Tensor, y: Tensor, flipped: Tensor | None, y_true: Tensor | None) -> Tensor:
    """Counts of one batch, (7,) int64: samples, predicted = observed label; where the truth is known,
    clean samples, of them predicted right; flipped samples, of them predicted as their observed (wrong)
    label (memorised) and as their true label (corrected). ``pred``, ``y``, ``flipped``, ``y_true``: (n,)."""
    hit = pred == y
    rows = [torch.ones_like(hit), hit]
    if flipped is not None:
        rows += [~flipped, hit & ~flipped, flipped, hit & flipped, (pred == y_true) & flipped]
    counts = torch.stack(rows).sum(1)
    return torch.cat([counts, counts.new_zeros(7 - len(counts))])


def train_accuracies(counts: Tensor, *, truth_known: bool) -> dict:
    """Percentages of an epoch's :func:`accuracy_counts` (None where no sample counted): ``train_acc``
    (observed labels); where the truth is known, ``train_acc_clean``, ``train_acc_flipped`` (flipped
    samples predicted as their true label: the correction) and ``train_memorized`` (flipped samples
    predicted as their observed, wrong label: the memorisation of the paper's Fig. 2)."""
    c = counts.tolist()
    pct = lambda part, whole: 100.0 * part / whole if whole else None  # noqa: E731
    out = {"train_acc": pct(c[1], c[0])}
    if truth_known:
        out.update(train_acc_clean=pct(c[3], c[2]), train_acc_flipped=pct(c[6], c[4]), train_memorized=pct(c[5], c[4]))
    return out


# ---- histograms of the meta-weights, for TensorBoard

# right edges of the buckets of a weight times the batch size (1 = an average sample's share of the
# n weights); one bucket below (exact zeros: `sum` clamps many) and one above the last edge
WEIGHT_BIN_EDGES = torch.linspace(0.0, 4.0, 41, dtype=torch.float64)


def accumulate_weight_hist(hist: Tensor, moments: Tensor, alpha: Tensor, beta: Tensor) -> None:
    """Add a step's weights (n,) to ``hist`` (2, 42), bucket counts of alpha and beta over
    :data:`WEIGHT_BIN_EDGES`, and to ``moments`` (2, 4): min, max, sum and sum of squares."""
    n = len(alpha)
    for row, w in enumerate((alpha, beta)):
        w = w.detach().double().cpu() * n
        hist[row] += torch.bincount(torch.bucketize(w, WEIGHT_BIN_EDGES), minlength=hist.shape[1]).double()
        moments[row, 0] = min(moments[row, 0], w.min())
        moments[row, 1] = max(moments[row, 1], w.max())
        moments[row, 2] += w.sum()
        moments[row, 3] += (w * w).sum()


# ---- the optional writers of --log

def resolve_logs(spec: str) -> tuple[str, ...]:
    """The writers of ``--log``: auto is tensorboard where the package is installed, else csv.

    An explicit tensorboard without the package is an :class:`L2BError` naming the extra to install.
    """
    kinds = tuple(k.strip() for k in spec.split(","))
    if kinds == ("none",):
        return ()
    if kinds == ("auto",):
        return ("tensorboard",) if _summary_writer() is not None else ("csv",)
    if "tensorboard" in kinds and _summary_writer() is None:
        raise L2BError("--log tensorboard needs the tensorboard package: pip install 'l2b[tensorboard]' "
                       "(or pip install tensorboard)")
    return kinds


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        return None
    return SummaryWriter


class EpochLogs:
    """The per-epoch writers of ``--log`` (rank 0): metrics.csv and TensorBoard event files in ``out``.

    Both hold what metrics.jsonl holds; TensorBoard adds histograms of alpha and beta per epoch. On a
    resume (``metrics``: the finished epochs) the CSV is rewritten from them and TensorBoard drops what
    an interrupted process logged for later epochs, so the curves match an uninterrupted run.
    """

    def __init__(self, out: Path, kinds: tuple[str, ...], *, metrics: list[dict] | None = None):
        self.out, self.kinds, self.writer = out, kinds, None
        if "tensorboard" in kinds:
            resumed_at = len(metrics) if metrics is not None else None
            self.writer = _summary_writer()(log_dir=str(out),
                                            purge_step=None if resumed_at is None else resumed_at + 1)
        if "csv" in kinds and metrics is not None:
            write_csv(out / "metrics.csv", metrics)

    def epoch(self, metrics: list[dict], hist: Tensor, moments: Tensor) -> None:
        """Log the last line of ``metrics``, with the epoch's weight histograms (:func:`accumulate_weight_hist`)."""
        if "csv" in self.kinds:
            write_csv(self.out / "metrics.csv", metrics)
        if self.writer is None:
            return
        line, step = metrics[-1], metrics[-1]["epoch"]
        for key, value in line.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(scalar_tag(key), value, step)
        total = hist.sum(1)
        for row, name in enumerate(("alpha", "beta")):
            if total[row] > 0:
                top = max(float(moments[row, 1]), float(WEIGHT_BIN_EDGES[-1]) + 0.1)  # overflow bucket's edge
                limits = [*WEIGHT_BIN_EDGES.tolist(), top]
                self.writer.add_histogram_raw(
                    f"weights/{name}", min=float(moments[row, 0]), max=float(moments[row, 1]), num=int(total[row]),
                    sum=float(moments[row, 2]), sum_squares=float(moments[row, 3]), bucket_limits=limits,
                    bucket_counts=hist[row].tolist(), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics key: train_acc -> train/acc, alpha_flipped -> weights/alpha_flipped
    (beside the histograms), lr -> run/lr."""
    head, _, rest = key.partition("_")
    if rest and head in ("train", "val", "test"):
        return f"{head}/{rest}"
    return f"weights/{key}" if rest and head in ("alpha", "beta") else f"run/{key}"


def write_csv(path: Path, metrics: list[dict]) -> None:
    """metrics.csv: one row per epoch, the columns of every key seen (in order of appearance); empty = None."""
    columns = list(dict.fromkeys(k for m in metrics for k in m))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, columns, restval="")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in m.items()} for m in metrics)
    text = buf.getvalue().encode()
    write_atomically(path, lambda fh: fh.write(text))
