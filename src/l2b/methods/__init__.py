"""Training methods: small policies over the one trainer, found through ``l2b.registry.METHODS``.

``base`` defines what a method is; ``reweight`` holds cross-entropy and the L2B family, ``simple`` the
non-meta baselines, ``metanet`` the meta-network baselines. Importing this package registers them all.
"""

from . import metanet, reweight, simple  # noqa: F401  (each registers its methods)
from .base import (
    Method,
    PrepareContext,
    StepContext,
    StepResult,
    create_method,
    fits_clean_set,
    list_methods,
    register_method,
)

__all__ = ["Method", "PrepareContext", "StepContext", "StepResult", "create_method", "fits_clean_set", "list_methods", "register_method"]
