"""A trained run as a predictor: rebuild its model from the run folder, predict, evaluate.

The model is rebuilt from ``config.yaml`` (``create_model(cfg.model, num_classes, in_channels)``),
its weights from ``checkpoint.pt`` (loaded without running code), its input normalisation from
``normalization.json``. Data come from a source spec ``KIND:PATH`` read by ``l2b.data.user.read_inputs``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import load_yaml, make_config
from ..errors import L2BError
from ..models import create_model
from ..runfiles import next_free
from ..train.checkpoint import safe_load

log = logging.getLogger(__name__)

__all__ = ["RunModel", "load_run_model", "resolve_checkpoint", "prediction_table", "confusion_matrix",
           "classification_report", "plot_confusion", "new_output_path"]

try:
    import sklearn.metrics as sk_metrics

    has_sklearn = True
except ImportError:
    has_sklearn = False


@dataclass
class RunModel:
    """A run's trained model with what its inputs need."""

    model: nn.Module
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    input_shape: tuple[int, ...]  # (C, H, W) the model was trained on
    scale: float  # inputs stored as uint8 are divided by this (255), floats are used as given
    classes: list[str]
    device: torch.device
    checkpoint: str = ""  # which weights, in words: the file and its epoch

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def inputs(self, x: np.ndarray) -> torch.Tensor:
        """Bring ``x`` to the training layout (N, C, H, W) and normalisation."""
        x = _to_layout(np.asarray(x), self.input_shape)
        t = torch.as_tensor(x).float()
        if x.dtype == np.uint8:
            t = t / self.scale
        elif self.scale != 1.0 and len(t) and float(t.abs().max()) > 1.5:
            log.warning("float inputs above 1.5 for a model trained on uint8 images: floats are taken as [0, 1]")
        return (t - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Class probabilities (N, K) in eval mode."""
        self.model.eval()
        out = [torch.softmax(self.model(self.inputs(x[s : s + batch_size]).to(self.device)).float(), 1).cpu()
               for s in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)


def _to_layout(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(N, C, H, W) from (N, C, H, W), (N, H, W) [one channel], (N, H, W, C) or (N, D) [D x 1 x 1]."""
    shape = tuple(shape)
    if x.shape[1:] == shape:
        return x
    if x.ndim == 3 and shape[0] == 1 and x.shape[1:] == shape[1:]:
        return x[:, None]
    if x.ndim == 4 and x.shape[1:] == (shape[1], shape[2], shape[0]):
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 2 and shape[1:] == (1, 1) and x.shape[1] == shape[0]:
        return x.reshape(len(x), shape[0], 1, 1)
    raise L2BError(f"inputs of shape {x.shape[1:]} per sample do not fit a model trained on {shape} "
                   "(accepted: C,H,W / H,W,C / H,W for one channel / D for feature vectors)")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run folder, weights file) of ``path``: a run folder (its checkpoint.pt, the last epoch's model), or
    a ``.pt`` file of a run folder (``checkpoint.pt``, ``best.pt`` or a kept ``checkpoint-epochNNNN.pt``)."""
    path = Path(path)
    if path.is_dir():
        return path, path / "checkpoint.pt"
    if path.suffix == ".pt":
        return path.parent, path
    raise L2BError(f"--checkpoint {path}: not a run folder or a .pt file of one (checkpoint.pt, best.pt)")


def load_run_model(run_dir: str | Path, device: str = "cpu") -> RunModel:
    """Rebuild a finished run's model: architecture from config.yaml, weights from checkpoint.pt (or the
    ``.pt`` file given instead of the folder, e.g. best.pt)."""
    run, weights = resolve_checkpoint(run_dir)
    for name in ("config.yaml", weights.name, "normalization.json", "classes.json"):
        if not (run / name).is_file():
            raise L2BError(f"{run / name} not found: --checkpoint takes the folder of an `l2b train` run, or its "
                           "checkpoint.pt or best.pt")
    cfg = make_config(load_yaml(run / "config.yaml"), source=str(run / "config.yaml"))
    norm = json.loads((run / "normalization.json").read_text())
    classes = json.loads((run / "classes.json").read_text())
    shape = tuple(norm["input_shape"])
    model = create_model(cfg.model, num_classes=len(classes), in_channels=shape[0])
    state = safe_load(weights)
    if not isinstance(state, dict) or "model" not in state:
        raise L2BError(f"{weights}: not a checkpoint of an `l2b train` run (no model weights in it)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise L2BError(f"{weights}: weights do not fit model {cfg.model!r} "
                       f"({str(exc).splitlines()[0]})") from None
    epoch = state.get("epoch", (state.get("position") or {}).get("epoch"))
    which = f"{weights} ({'best clean-validation model, ' if 'val_acc' in state else ''}epoch {epoch})"
    dev = torch.device(device)
    return RunModel(model.to(dev).eval(), torch.tensor(norm["mean"]), torch.tensor(norm["std"]), shape,
                    float(norm.get("scale", 255.0)), classes, dev, which)


def prediction_table(probs: np.ndarray, classes: list[str], paths: list[str] | None = None) -> dict:
    """Columns of predictions.csv: index (or path), predicted class (and its name), prob per class."""
    table = {"path": np.asarray(paths, dtype=object)} if paths is not None else {"index": np.arange(len(probs))}
    pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    table["predicted"] = pred
    table["predicted_name"] = np.asarray(classes, dtype=object)[pred]
    for k in range(probs.shape[1]):
        table[f"prob_{k}"] = probs[:, k]
    return table


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, -1)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class precision / recall / F1 / support and the confusion matrix (rows: true class,
    columns: predicted class), with sklearn.metrics where installed. A class never predicted has
    precision 0; one absent from ``y_true`` has recall 0 (sklearn's ``zero_division=0``)."""
    k = len(classes)
    if has_sklearn:
        cm = sk_metrics.confusion_matrix(y_true, y_pred, labels=list(range(k)))
        precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(k)), zero_division=0)
    else:
        cm = confusion_matrix(y_true, y_pred, k)
        tp, predicted, support = np.diag(cm).astype(float), cm.sum(0), cm.sum(1)
        precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    per_class = [{"class": c, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(support[i])} for i, c in enumerate(classes)]
    return {"accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else None, "num_samples": int(len(y_true)),
            "macro_f1": float(np.mean(f1)), "per_class": per_class, "confusion_matrix": np.asarray(cm).tolist(),
            "confusion_matrix_axes": "rows: true class, columns: predicted class", "classes": list(classes)}


def new_output_path(out: str | None, default: Path, suffixes: tuple[str, ...], flag: str) -> Path:
    """Where to write: ``out`` (it must not exist and must end in one of ``suffixes``), else ``default``,
    numbered (``eval-2.json``, ...) where it exists. Nothing the user has is ever overwritten."""
    if out is not None:
        path = Path(out)
        if path.suffix.lower() not in suffixes:
            raise L2BError(f"{flag} {out}: the file name must end in {' or '.join(suffixes)}")
        if path.exists():
            raise L2BError(f"{flag} {out} already exists; choose another name (nothing was overwritten)")
        if not path.parent.is_dir():
            raise L2BError(f"{flag} {out}: folder {path.parent} does not exist")
        return path
    return next_free(default)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> bool:
    """Write the confusion matrix as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * k, 1 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
