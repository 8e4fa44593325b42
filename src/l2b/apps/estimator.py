"""``L2BClassifier``: the one trainer behind a scikit-learn estimator.

With scikit-learn installed (``pip install l2b[sklearn]``) it is a real one: it inherits ``BaseEstimator``
and ``ClassifierMixin`` (tags, ``clone``, ``Pipeline``, ``GridSearchCV``, metadata routing) and validates
its input with sklearn's own helpers. Without sklearn it keeps the same interface on its own.
"""

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

__all__ = ["L2BClassifier", "NotFittedError", "InputError"]

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import NotFittedError as SklearnNotFittedError
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import validate_data

    has_sklearn = True
except ImportError:
    has_sklearn = False


class InputError(L2BError, ValueError):
    """Bad input to the estimator: an :class:`L2BError` that sklearn code catches as a ``ValueError``."""


if has_sklearn:
    class NotFittedError(L2BError, SklearnNotFittedError):
        """``predict`` before ``fit``: sklearn's NotFittedError (a ValueError and AttributeError)."""
else:
    class NotFittedError(L2BError, ValueError, AttributeError):  # the same bases as sklearn's
        """``predict`` before ``fit`` (a ValueError and AttributeError, as in sklearn)."""


class _Params:
    """sklearn's parameter protocol, for when sklearn is not installed (BaseEstimator provides it otherwise)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor parameters (``deep`` is accepted for sklearn; there are no nested estimators)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise InputError(f"invalid parameter {name!r} for {type(self).__name__}; valid: {', '.join(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        default = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v is not default[k] and v != default[k]]
        return f"{type(self).__name__}({', '.join(changed)})"

    def score(self, X, y) -> float:
        """Mean accuracy on (X, y)."""
        return float(np.mean(self.predict(X) == np.asarray(y)))


_BASES = (ClassifierMixin, BaseEstimator) if has_sklearn else (_Params,)

try:
    import pandas as pd

    has_pandas = True
except ImportError:
    has_pandas = False


class L2BClassifier(*_BASES):
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

    Notes
    -----
    ``sklearn.utils.estimator_checks.check_estimator`` passes (tests/test_owndata.py runs it), except
    ``check_array_api_input``, which sklearn skips unless ``SCIPY_ARRAY_API`` is set: the estimator
    takes NumPy arrays (and what converts to them), not other array-API namespaces; torch does the math.
    A trusted set in a ``Pipeline``: ``sklearn.set_config(enable_metadata_routing=True)``, then
    ``make_pipeline(StandardScaler(), L2BClassifier().set_fit_request(trusted=True)).fit(X, y, trusted=mask)``.

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

    # ------------------------------------------------------------ fit

    def fit(self, X, y, X_val=None, y_val=None, *, trusted=None) -> "L2BClassifier":
        """Train on (X, y) whose labels may be wrong.

        Parameters
        ----------
        X : array, shape (N, D), (N, H, W) or (N, C, H, W)
            Feature vectors (float) or images (uint8 on 0..255, or float).
        y : array, shape (N,)
            Observed, possibly wrong labels (any values; ``classes_`` holds them sorted).
        X_val, y_val : arrays, optional
            A small trusted set, same layout. Without one, ``meta_set`` must be ``auto`` or ``pseudo``.
        trusted : array of bool, shape (N,), optional
            The rows of (X, y) whose labels are trusted: they form the trusted set, the others are
            trained on. Being per-sample, it travels the sklearn way: split by ``cross_val_score``,
            routed by metadata routing (``set_fit_request(trusted=True)``), and in a ``Pipeline`` its
            rows are transformed with ``X``, as the trusted set must be.
        """
        x, y_arr = self._validate(X, y, reset=True)
        if trusted is not None:
            if X_val is not None or y_val is not None:
                raise InputError("give the trusted set as trusted= (a mask over the rows of X) or as X_val, y_val, "
                                 "not both")
            mask = np.asarray(trusted)
            if mask.dtype != bool or mask.shape != (len(x),):
                raise InputError(f"trusted must be a boolean mask of shape ({len(x)},), got {mask.dtype} {mask.shape}")
            if mask.all():
                raise InputError("trusted marks every row: no row is left to train on")
            x, y_arr, X_val, y_val = x[~mask], y_arr[~mask], x[mask], y_arr[mask]
            if not mask.any():
                X_val = y_val = None
        if (X_val is None) != (y_val is None):
            raise InputError("give both X_val and y_val, or neither")
        if self.augment and x.shape[2:] == (1, 1):
            raise InputError("augment=True crops and flips images; it does not apply to feature vectors")
        has_val = X_val is not None
        meta_set = {"auto": "clean" if has_val else "pseudo"}.get(self.meta_set, self.meta_set)
        if meta_set == "clean" and not has_val:
            raise InputError("meta_set='clean' needs a trusted set: fit(X, y, X_val=..., y_val=...) or "
                             "fit(X, y, trusted=mask); or use meta_set='pseudo' to pick one from the training data")
        x_val = _as_inputs(X_val, "X_val") if has_val else np.zeros((0,) + x.shape[1:], x.dtype)
        y_val_arr = np.asarray(y_val) if has_val else y_arr[:0]
        if x_val.shape[1:] != x.shape[1:] or len(x_val) != len(y_val_arr):
            raise InputError(f"X_val, y_val: {len(x_val)} samples of shape {x_val.shape[1:]} and {len(y_val_arr)} "
                             f"labels; X samples have shape {x.shape[1:]}")
        self.classes_ = np.unique(np.concatenate([y_arr, y_val_arr]))
        if len(self.classes_) < 2:
            raise InputError(f"y has 1 class ({self.classes_[0]!r}); a classifier needs at least 2 classes")
        if len(x) < 2:
            raise InputError(f"{len(x)} sample(s) to train on; training needs at least 2 samples")
        codes, val_codes = np.searchsorted(self.classes_, y_arr), np.searchsorted(self.classes_, y_val_arr)
        names = [str(c) for c in self.classes_]
        data = ImageData("arrays", names, x, codes, x[:0], codes[:0], x_val=x_val, y_val=val_codes,
                         noisy_train=codes, train_labels_known=False)
        with tempfile.TemporaryDirectory(prefix="l2b-fit-") as tmp:
            out = Path(self.run_dir) if self.run_dir else Path(tmp) / "run"
            cfg = self._config(meta_set, out)
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

    def _validate(self, X, y=None, *, reset: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, H, W) inputs (and labels) checked with sklearn's own helpers where installed: finite,
        numeric, at least one sample, as many features as in fit (``n_features_in_``)."""
        if has_sklearn:
            if y is None and reset:
                X, y = validate_data(self, X, y, reset=reset, allow_nd=True, dtype="numeric")  # raises: y needed
            elif y is None:
                X = validate_data(self, X, reset=reset, allow_nd=True, dtype="numeric")
            else:
                X, y = validate_data(self, X, y, reset=reset, allow_nd=True, dtype="numeric")
                check_classification_targets(y)
        else:
            X = np.asarray(X)
            if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool) or not np.isfinite(X).all():
                raise InputError(f"X must be finite numbers, got dtype {X.dtype}")
            if X.ndim < 2 or len(X) == 0:
                raise InputError(f"X must hold at least one sample of shape (D,) or (C, H, W), got shape {X.shape}")
            if reset:
                self.n_features_in_ = X.shape[1]
            elif X.shape[1] != self.n_features_in_:
                raise InputError(f"X has {X.shape[1]} features, but L2BClassifier is expecting "
                                 f"{self.n_features_in_} features as input")
            if y is not None:
                y = np.asarray(y)
                if y.ndim != 1 or len(y) != len(X):
                    raise InputError(f"y must be a vector of {len(X)} labels, got shape {y.shape}")
        return _as_inputs(X, "X"), y

    def _config(self, meta_set: str, out: Path):
        name = self.module if isinstance(self.module, str) or self.module is None else type(self.module).__name__
        return make_config({
            "method": self.method, "model": name or "small-cnn", "noise": "none", "subset": None, "val_size": 0,
            "test_every": 0, "augment": self.augment, "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs, "batch_size": self.batch_size,
            "val_batch_size": self.val_batch_size, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "grad_clip": self.grad_clip, "normalize": self.normalize,
            "temperature": self.temperature, "meta_loss": self.meta_loss, "pseudo_from": self.pseudo_from,
            "meta_set": meta_set, "pseudo_size": self.pseudo_size,
            "meta_confidence": self.meta_confidence, "meta_refresh": self.meta_refresh,
            "seed": self.random_state, "device": self.device, "out": str(out),
            "log": "auto" if self.run_dir else "none",  # no event files in a folder deleted after fit()
        }, source="L2BClassifier parameters")

    def _build_module(self, num_classes: int, shape: tuple[int, ...]) -> nn.Module:
        if isinstance(self.module, nn.Module):
            return copy.deepcopy(self.module)
        if self.module is not None and not isinstance(self.module, str):
            raise InputError(f"module must be a model name or a torch.nn.Module, got {type(self.module).__name__}")
        name = self.module or ("mlp" if shape[1:] == (1, 1) else "small-cnn")
        extra = {"in_features": int(np.prod(shape))} if name == "mlp" else {}
        return create_model(name, num_classes=num_classes, in_channels=shape[0], **extra)

    # ------------------------------------------------------------ after fit

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, K), columns in the order of ``classes_``."""
        self._check_fitted()
        x, _ = self._validate(X, reset=False)
        return self._runner.predict_proba(x)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample, as a value of ``classes_``."""
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]

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
        raise InputError(f"{name} must be (N, D) feature vectors or (N, [C,] H, W) images, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)  # floats are used as given; uint8 images are scaled to [0, 1]
    return np.ascontiguousarray(x)
