"""What a training method is: a small policy over the one trainer, found through a registry.

A method says what loss a training batch gets (and, for meta methods, the per-sample weights); the
trainer (``l2b.train``) does everything else: data, schedule, clipping, the optimizer step,
evaluation, checkpoints and logs. docs/EXTENDING.md shows a new method registered from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from ..registry import METHODS

__all__ = ["Method", "PrepareContext", "StepContext", "StepResult", "register_method", "create_method",
           "list_methods"]


@dataclass
class StepContext:
    """What a method may use besides the batch.

    ``next_clean()`` returns the next clean batch (x_val, y_val) from a persistent, cycling,
    reshuffled source; ``optimizer`` is the real step's optimizer with this step's lr already set.
    Under data parallelism ``model`` (the step's argument) is the DistributedDataParallel wrapper
    for the real forward, ``module`` the unwrapped network for the meta passes, and ``world_size``
    the number of ranks; ``meta_grad`` picks the exact JVP or the finite difference.
    """

    optimizer: torch.optim.Optimizer
    next_clean: Callable[[], tuple[Tensor, Tensor]]
    epoch: int
    num_classes: int
    module: nn.Module | None = None
    world_size: int = 1
    meta_grad: str = "exact"
    # the real forward may carry the meta pass (exact: the tangent; fd: f(theta)); False under
    # SyncBatchNorm (no forward-mode derivative, cross-rank statistics) and torch.compile
    fuse_forward: bool = True


@dataclass
class PrepareContext:
    """What a method's optional ``prepare(ctx)`` hook gets, once, before the first epoch.

    ``new_model()`` builds a fresh model of the run's architecture on the device; ``fit(model, images,
    labels, epochs)`` trains it with plain cross-entropy (the run's SGD settings, a cosine schedule over
    ``epochs``); ``data`` is the run's ``l2b.data.TrainData``. ``state`` is None on a fresh run and,
    on resume, what the method's ``state_dict()`` returned at the last checkpoint: restore it instead
    of training a stage again.
    """

    cfg: object
    data: object
    device: torch.device
    new_model: Callable[[], nn.Module]
    fit: Callable[..., None]
    state: dict | None = None


@dataclass
class StepResult:
    """The loss to backpropagate, and optionally the per-sample weights (n,) and pseudo-labels (n,)."""

    loss: Tensor
    alpha: Tensor | None = None
    beta: Tensor | None = None
    pseudo: Tensor | None = None
    logits: Tensor | None = field(default=None, repr=False)


class Method(Protocol):
    """A training method.

    Attributes
    ----------
    name : str
    uses_meta_set : bool
        Draws clean batches every step (the trainer then builds the cycling clean source).
    trains_on_clean : bool
        The clean set is appended to the training set, with its true labels (``ce+clean``).
    fits_clean_set : bool, optional
        The training loss includes the clean images with their true labels (``ce+clean``, ``glc``): their
        accuracy is then a training accuracy, and the best clean-validation epoch selects nothing.
        Optional (:func:`fits_clean_set` reads it); without it, ``trains_on_clean``.
    warmup_with_ce : bool
        During the warm-up epochs the trainer uses plain cross-entropy instead.
    """

    name: str
    uses_meta_set: bool
    trains_on_clean: bool
    warmup_with_ce: bool

    def step(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> StepResult: ...


def fits_clean_set(method: Method) -> bool:
    """Whether ``method`` trains on the clean images, so their accuracy selects nothing (an optional member:
    methods written before it existed fall back to ``trains_on_clean``)."""
    return getattr(method, "fits_clean_set", method.trains_on_clean)


def register_method(name: str):
    """Decorator: make ``factory(**config_values) -> Method`` available as ``--method NAME``.

    The factory receives every config value as a keyword argument and takes the ones it reads
    (end its signature with ``**_``); docs/EXTENDING.md has a complete example.
    """
    return METHODS.register(name)


def list_methods() -> list[str]:
    return METHODS.names()


def create_method(name: str, **options) -> Method:
    """Build a method by name; options it does not take are ignored (one config feeds all)."""
    return METHODS.get(name)(**options)
