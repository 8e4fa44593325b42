"""l2b: Learning to Bootstrap (Zhou et al., CVPR 2024) for training with noisy labels.

The public surface: train a method (``train``, ``Config``), extend the library (``register_method``,
``register_dataset``, ``register_model``), compute the meta-weights in your own loop (``meta_weights``),
and the scikit-learn style estimator (``L2BClassifier``). docs/EXTENDING.md shows each extension point.
"""

from .config import Config, make_config
from .data import ImageData, register_dataset
from .errors import L2BError
from .meta import MODES, NORMALIZATIONS, MetaWeights, meta_weights, normalize_weights
from .methods import Method, PrepareContext, StepContext, StepResult, list_methods, register_method
from .models import create_model, list_models, register_model
from .train import train
from .version import __version__


__all__ = [
    "__version__",
    "Config",
    "ImageData",
    "L2BClassifier",
    "L2BError",
    "MODES",
    "Method",
    "MetaWeights",
    "NORMALIZATIONS",
    "PrepareContext",
    "StepContext",
    "StepResult",
    "create_model",
    "list_methods",
    "list_models",
    "make_config",
    "meta_weights",
    "normalize_weights",
    "register_dataset",
    "register_method",
    "register_model",
    "train",
]


def __getattr__(name: str):
    # the estimator pulls in scikit-learn where it is installed: imported on first use, not with l2b
    if name == "L2BClassifier":
        from .apps.estimator import L2BClassifier

        return L2BClassifier
    raise AttributeError(f"module 'l2b' has no attribute {name!r}")
