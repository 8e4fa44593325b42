"""``L2BClassifier``: the one trainer behind an sklearn-style estimator (sklearn itself is not needed)."""

from __future__ import annotations

import copy
import inspect
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import make_config
from ..data.arrays import ImageData
from ..errors import L2BError
from ..runfiles import read_table
from ..train import train
from .labels import DEFAULT_THRESHOLD, find_label_issues
from ..models import create_model
from .predict import RunModel

__all__ = ["L2BClassifier"]

try:
    import pandas as pd

    has_pandas = True
except ImportError:
    has_pandas = False


class L2BClassifier:
    """Train a classifier on noisy labels with L2B (or any registered method), sklearn style.

    Parameters
    ----------
    module : str or torch.nn.Module, optional
        A registered model name, or a module (it is copied at ``fit``, never changed). Default:
        ``"mlp"`` for feature vectors (N, D), ``"small-cnn"`` for images.
    method : str, default="l2b"
        Any ``l2b train --method``.
    epochs, warmup_epochs, lr, batch_size, val_batch_size, momentum, weight_decay, grad_clip,
    normalize, temperature, meta_loss, pseudo_from, augment :
        As the ``l2b train`` flags of the same names.
    meta_set : {"auto", "clean", "pseudo"}, default="auto"
        Where the meta-gradient's batches come from: ``clean`` needs ``X_val, y_val`` in ``fit``;
        ``pseudo`` picks confident training samples that agree with their label after warm-up
        (no clean set needed); ``auto`` is ``clean`` when ``fit`` gets ``X_val``, else ``pseudo``.
        A clean set is never carved out of ``X, y``: those labels are the noisy ones.
    pseudo_size, meta_confidence, meta_refresh :
        The pseudo meta set's size, confidence threshold and refresh period (epochs).
    random_state : int, default=0
        Seeds the initialisation, the data order and the pseudo meta set.
    device : str, default="auto"
    run_dir : str, optional
        Keep the run folder there (it must not exist); default: a temporary folder, removed after fit.
    verbose : bool, default=False
        Progress bar and per-epoch lines.

    Attributes
    ----------
    classes_ : np.ndarray, shape (K,)
    module_ : torch.nn.Module
        The trained model.
    history_ : list of dict
        The per-epoch metrics (``val_acc`` on ``X_val`` when given, else None).

    Examples
    --------
    >>> clf = L2BClassifier(epochs=20).fit(X, y_noisy, X_val=X_clean, y_val=y_clean)  # doctest: +SKIP
    >>> clf.predict(X_test); clf.label_issues().head()  # doctest: +SKIP
    """

    def __init__(self, module=None, *, method="l2b", epochs=20, warmup_epochs=1, lr=0.05, batch_size=128,
                 val_batch_size=100, momentum=0.9, weight_decay=5e-4, grad_clip=5.0, normalize="sum",
                 temperature=10.0, meta_loss="mean", pseudo_from="train", augment=False, meta_set="auto", pseudo_size=1000, meta_confidence=0.0,
                 meta_refresh=1, random_state=0, device="auto", run_dir=None, verbose=False):
        # sklearn convention: store the parameters verbatim, validate in fit
        self.module, self.method, self.epochs, self.warmup_epochs = module, method, epochs, warmup_epochs
        self.lr, self.batch_size, self.val_batch_size = lr, batch_size, val_batch_size
        self.momentum, self.weight_decay, self.grad_clip = momentum, weight_decay, grad_clip
        self.normalize, self.temperature, self.augment = normalize, temperature, augment
        self.meta_loss, self.pseudo_from = meta_loss, pseudo_from
        self.meta_set, self.pseudo_size = meta_set, pseudo_size
        self.meta_confidence, self.meta_refresh = meta_confidence, meta_refresh
        self.random_state, self.device, self.run_dir, self.verbose = random_state, device, run_dir, verbose

    # ------------------------------------------------------------ sklearn's parameter protocol

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor parameters (``deep`` is accepted for sklearn; there are no nested estimators)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "L2BClassifier":
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for L2BClassifier; valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        default = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v is not default[k] and v != default[k]]
        return f"L2BClassifier({', '.join(changed)})"

    # ------------------------------------------------------------ fit

    def fit(self, X, y, X_val=None, y_val=None) -> "L2BClassifier":
        """Train on (X, y) whose labels may be wrong.

        Parameters
        ----------
        X : array, shape (N, D), (N, H, W) or (N, C, H, W)
            Feature vectors (float) or images (uint8 on 0..255, or float).
        y : array, shape (N,)
            Observed, possibly wrong labels (any values; ``classes_`` holds them sorted).
        X_val, y_val : arrays, optional
            A small trusted set, same layout. Without it, ``meta_set`` must be ``auto`` or ``pseudo``.
        """

        x, y_arr = _as_inputs(X, "X"), np.asarray(y)
        if y_arr.ndim != 1 or len(y_arr) != len(x):
            raise L2BError(f"y must be a vector of {len(x)} labels, got shape {y_arr.shape}")
        if (X_val is None) != (y_val is None):
            raise L2BError("give both X_val and y_val, or neither")
        if self.augment and x.shape[2:] == (1, 1):
            raise L2BError("augment=True crops and flips images; it does not apply to feature vectors")
        has_val = X_val is not None
        meta_set = {"auto": "clean" if has_val else "pseudo"}.get(self.meta_set, self.meta_set)
        if meta_set == "clean" and not has_val:
            raise L2BError("meta_set='clean' needs a trusted set: fit(X, y, X_val=..., y_val=...); "
                           "or use meta_set='pseudo' to pick one from the training data")
        x_val = _as_inputs(X_val, "X_val") if has_val else np.zeros((0,) + x.shape[1:], x.dtype)
        y_val_arr = np.asarray(y_val) if has_val else y_arr[:0]
        if x_val.shape[1:] != x.shape[1:]:
            raise L2BError(f"X_val samples have shape {x_val.shape[1:]}, X samples {x.shape[1:]}")
        self.classes_ = np.unique(np.concatenate([y_arr, y_val_arr]))
        codes, val_codes = np.searchsorted(self.classes_, y_arr), np.searchsorted(self.classes_, y_val_arr)
        names = [str(c) for c in self.classes_]
        data = ImageData("arrays", names, x, codes, x[:0], codes[:0], x_val=x_val, y_val=val_codes,
                         noisy_train=codes, train_labels_known=False)
        with tempfile.TemporaryDirectory(prefix="l2b-fit-") as tmp:
            out = Path(self.run_dir) if self.run_dir else Path(tmp) / "run"
            cfg = self._config(meta_set, len(x_val), out)
            torch.manual_seed(self.random_state)
            model = self._build_module(len(names), x.shape[1:])
            train(cfg, progress=self.verbose, data=data, model=model)
            norm = json.loads((out / "normalization.json").read_text())
            self.history_ = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            self.per_sample_ = read_table(out / "per_sample.csv")
        self.module_ = model.eval()
        self._runner = RunModel(model, torch.tensor(norm["mean"]), torch.tensor(norm["std"]),
                                tuple(norm["input_shape"]), float(norm["scale"]), names,
                                next(model.parameters()).device)
        return self

    def _config(self, meta_set: str, n_val: int, out: Path):
        name = self.module if isinstance(self.module, str) or self.module is None else type(self.module).__name__
        return make_config({
            "method": self.method, "model": name or "small-cnn", "noise": "none", "noise_rate": 0.0,
            "subset": None, "val_size": n_val, "augment": self.augment, "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs, "batch_size": self.batch_size,
            "val_batch_size": self.val_batch_size, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "grad_clip": self.grad_clip, "normalize": self.normalize,
            "temperature": self.temperature, "meta_loss": self.meta_loss, "pseudo_from": self.pseudo_from,
            "meta_set": meta_set, "pseudo_size": self.pseudo_size,
            "meta_confidence": self.meta_confidence, "meta_refresh": self.meta_refresh,
            "seed": self.random_state, "device": self.device, "out": str(out),
        }, source="L2BClassifier parameters")

    def _build_module(self, num_classes: int, shape: tuple[int, ...]) -> nn.Module:
        if isinstance(self.module, nn.Module):
            return copy.deepcopy(self.module)
        if self.module is not None and not isinstance(self.module, str):
            raise L2BError(f"module must be a model name or a torch.nn.Module, got {type(self.module).__name__}")
        name = self.module or ("mlp" if shape[1:] == (1, 1) else "small-cnn")
        extra = {"in_features": int(np.prod(shape))} if name == "mlp" else {}
        return create_model(name, num_classes=num_classes, in_channels=shape[0], **extra)

    # ------------------------------------------------------------ after fit

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise L2BError("this L2BClassifier is not fitted yet; call fit(X, y) first")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, K), columns in the order of ``classes_``."""
        self._check_fitted()
        return self._runner.predict_proba(_as_inputs(X, "X"))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample, as a value of ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]

    def score(self, X, y) -> float:
        """Mean accuracy on (X, y)."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def label_issues(self, threshold: float = DEFAULT_THRESHOLD):
        """The training labels ranked by label quality, lowest (likeliest wrong) first.

        Columns as ``l2b labels`` writes them (see ``l2b.apps.labels.find_label_issues``); ``index``
        is the row in the ``X`` given to ``fit``; labels are given as in ``y``.
        Returns a pandas DataFrame when pandas is installed, else a dict of arrays.
        """
        self._check_fitted()
        issues = find_label_issues(self.per_sample_, threshold=threshold)
        for col in ("given_label", "suggested_label"):
            issues[col] = self.classes_[issues[col]]
        return pd.DataFrame(issues) if has_pandas else issues


def _as_inputs(X, name: str) -> np.ndarray:
    """(N, C, H, W) from images (N, C, H, W) or (N, H, W), or from feature vectors (N, D) as (N, D, 1, 1)."""
    x = np.asarray(X)
    if x.ndim == 2:
        x = x.reshape(len(x), x.shape[1], 1, 1)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise L2BError(f"{name} must be (N, D) feature vectors or (N, [C,] H, W) images, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)  # floats are used as given; uint8 images are scaled to [0, 1]
    return np.ascontiguousarray(x)
