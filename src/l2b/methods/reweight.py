"""Cross-entropy and the meta-reweighting family: L2B (Algorithm 1) and its Table 7 ablations."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ..meta import meta_weights, weighted_forward
from .base import StepResult, register_method

__all__ = ["CrossEntropy", "MetaReweight"]


@dataclass
class CrossEntropy:
    """Plain cross-entropy on the observed labels."""

    name: str = "ce"
    uses_meta_set: bool = False
    trains_on_clean: bool = False
    warmup_with_ce: bool = False

    @property
    def fits_clean_set(self) -> bool:
        return self.trains_on_clean

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
    on the same batch; the real forward is the only one that moves BatchNorm running statistics. The
    pseudo-labels p_i of g_i are ``w.pseudo``: the argmax of the real forward, or of an eval-mode
    forward under ``pseudo_from="eval"``; g_i itself is always on the real forward's logits.
    Under ``mode="convex"`` each sample's pair sums to one, so the batch loss is their mean: the
    bootstrapping loss with a learned per-sample mix (Appendix B.1). ``l2rw`` is mode "beta0".
    The trainer supplies the rest of Algorithm 1: warm-up with cross-entropy, clipping, the update.
    """

    name: str
    mode: str
    normalize: str = "sum"
    temperature: float = 10.0
    meta_loss: str = "mean"  # the clean loss G over the clean batch: mean (Algorithm 1) or sum (eq. 7)
    pseudo_from: str = "train"  # p_i from the real (train-mode) forward or an eval-mode one
    uses_meta_set: bool = True
    trains_on_clean: bool = False
    fits_clean_set: bool = False  # the clean batch reaches the model only through the meta-gradient
    warmup_with_ce: bool = True

    def step(self, model, x, y, ctx):
        x_val, y_val = ctx.next_clean()
        module = ctx.module or model  # the meta passes never go through DDP / torch.compile
        options = dict(optimizer=ctx.optimizer, mode=self.mode, normalize=self.normalize,
                       temperature=self.temperature, distributed=ctx.world_size > 1, meta_loss=self.meta_loss,
                       pseudo_from=self.pseudo_from)
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
    def build(normalize: str = "sum", temperature: float = 10.0, meta_loss: str = "mean", pseudo_from: str = "train",
              **_):
        return MetaReweight(name, mode, normalize, temperature, meta_loss=meta_loss, pseudo_from=pseudo_from)

    build.__doc__ = f"`{name}`: meta-reweighting with mode={mode!r}."
    return build


for _name, _mode in (("l2b", "l2b"), ("l2rw", "beta0"), ("l2b-alpha0", "alpha0"), ("l2b-convex", "convex")):
    register_method(_name)(_meta_factory(_name, _mode))
