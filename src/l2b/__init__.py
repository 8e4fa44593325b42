"""l2b: Learning to Bootstrap (Zhou et al., CVPR 2022) for training with noisy labels."""

from ._errors import L2BError
from ._estimator import L2BClassifier
from ._meta import MODES, NORMALIZATIONS, MetaWeights, meta_weights, normalize_weights
from ._models import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "L2BClassifier",
    "L2BError",
    "MODES",
    "NORMALIZATIONS",
    "MetaWeights",
    "create_model",
    "list_models",
    "meta_weights",
    "normalize_weights",
    "register_model",
]
