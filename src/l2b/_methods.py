"""Training methods: small policies over the one trainer, found through a registry.

A method says what loss a training batch gets (and, for meta methods, the per-sample weights); the
trainer (`l2b._train`) does everything else: data, schedule, clipping, the optimizer step,
evaluation, checkpoints and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import check_choice
from ._meta import meta_weights, weighted_forward

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
    ``epochs``); ``data`` is the run's ``l2b._train.TrainData``. ``state`` is None on a fresh run and,
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
    warmup_with_ce : bool
        During the warm-up epochs the trainer uses plain cross-entropy instead.
    """

    name: str
    uses_meta_set: bool
    trains_on_clean: bool
    warmup_with_ce: bool

    def step(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> StepResult: ...

    # Optional, found with getattr: ``prepare(ctx: PrepareContext) -> None`` runs once before the loop
    # (a teacher, GLC's stage 1, building a meta network); ``state_dict() -> dict`` is checkpointed.


_METHODS: dict[str, Callable[..., Method]] = {}


def register_method(name: str):
    def add(factory):
        _METHODS[name] = factory
        return factory

    return add


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, **options) -> Method:
    """Build a method by name; options it does not take are ignored (one config feeds all)."""
    check_choice("method", name, _METHODS)
    return _METHODS[name](**options)


@dataclass
class CrossEntropy:
    """Plain cross-entropy on the observed labels."""

    name: str = "ce"
    uses_meta_set: bool = False
    trains_on_clean: bool = False
    warmup_with_ce: bool = False

    def step(self, model, x, y, ctx):
        logits = model(x)
        return StepResult(F.cross_entropy(logits, y), logits=logits)


@register_method("ce")
def _ce(**_):
    return CrossEntropy()


@register_method("ce+clean")
def _ce_clean(**_):
    """Cross-entropy on the noisy set plus the clean set: the honest baseline that sees the clean data too."""
    return CrossEntropy(name="ce+clean", trains_on_clean=True)


@dataclass
class MetaReweight:
    """L2B (Zhou et al. 2022, Algorithm 1) and its ablations (Table 7), one step:

    alpha, beta = meta_weights(...)  (eq. 5-9); loss = sum_i alpha_i f_i + beta_i g_i  (eq. 10),
    on the same batch; the real forward is the only one that moves BatchNorm running statistics.
    Under ``mode="convex"`` each sample's pair sums to one, so the batch loss is their mean: the
    bootstrapping loss with a learned per-sample mix (Appendix B.1). ``l2rw`` is mode "beta0".
    The trainer supplies the rest of Algorithm 1: warm-up with cross-entropy, clipping, the update.
    """

    name: str
    mode: str
    normalize: str = "sum"
    temperature: float = 10.0
    uses_meta_set: bool = True
    trains_on_clean: bool = False
    warmup_with_ce: bool = True

    def step(self, model, x, y, ctx):
        x_val, y_val = ctx.next_clean()
        module = ctx.module or model  # the meta passes never go through DDP / torch.compile
        options = dict(optimizer=ctx.optimizer, mode=self.mode, normalize=self.normalize,
                       temperature=self.temperature, distributed=ctx.world_size > 1)
        if ctx.fuse_forward and ctx.meta_grad == "exact":
            # meta_weights(...) and the real forward model(x) in one pass (through DDP's wrapper if any)
            w, logits = weighted_forward(module, x, y, x_val, y_val, wrapper=model, **options)
        elif ctx.meta_grad == "fd":  # fd reads f(theta) off the real forward
            logits = model(x)
            w = meta_weights(module, x, y, x_val, y_val, meta_grad="fd",
                             logits=logits.detach() if ctx.fuse_forward else None, **options)
        else:
            w = meta_weights(module, x, y, x_val, y_val, **options)
            logits = model(x)  # (n, K), the real forward
        f = F.cross_entropy(logits, y, reduction="none")
        g = F.cross_entropy(logits, w.pseudo, reduction="none")
        alpha, beta = w.alpha, w.beta
        if self.mode == "convex":  # alpha_i + beta_i = 1 per sample: the loss is the global-batch mean
            alpha, beta = alpha / (len(y) * ctx.world_size), beta / (len(y) * ctx.world_size)
        # weights sum to 1 over the global batch; DDP averages the ranks' gradients, hence * world_size.
        # The weights reported are those of the summed global-batch loss, for every mode alike.
        loss = (alpha * f + beta * g).sum() * ctx.world_size
        return StepResult(loss, alpha, beta, w.pseudo, logits)


def _meta_factory(name: str, mode: str):
    def build(normalize: str = "sum", temperature: float = 10.0, **_):
        return MetaReweight(name, mode, normalize, temperature)

    build.__doc__ = f"`{name}`: meta-reweighting with mode={mode!r}."
    return build


for _name, _mode in (("l2b", "l2b"), ("l2rw", "beta0"), ("l2b-alpha0", "alpha0"), ("l2b-convex", "convex")):
    register_method(_name)(_meta_factory(_name, _mode))

from . import _baselines  # noqa: E402,F401  (registers the baselines of the paper's tables)
