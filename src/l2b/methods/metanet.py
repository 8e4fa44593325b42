"""The meta-network baselines: MW-Net (Shu et al. 2019) and MLC (Zheng et al. 2021, simplified).

They reuse the core's look-ahead (``l2b.meta.lookahead_affine``, ``meta_mode``) and its forward-mode
directional derivatives: their meta-gradients are exact and first order, like L2B's. Hyperparameters
are Config keys: ``meta_lr``, ``meta_hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from ..errors import L2BError
from ..meta import directional_losses, lookahead_affine, meta_mode, scaled_clean_gradient
from .base import StepResult, register_method
from .simple import soft_cross_entropy

__all__ = ["mwnet_meta_grad", "mwnet_weights", "mlc_meta_grad", "WeightNet", "LabelCorrectionNet", "MWNet", "MLC"]


def _lookahead_clean_direction(model, params, theta, train_loss, x_val, y_val, optimizer):
    """v = s * grad G(theta_hat), theta_hat = theta' - s * grad train_loss(theta): the optimizer's own
    look-ahead (`lookahead_affine`) from the current weights. Call inside ``meta_mode``.

    Returns the direction v (dict name -> tensor) and the clean loss G(theta_hat) (a float).
    """
    shift, scale = lookahead_affine(params, optimizer)
    grads = torch.autograd.grad(train_loss, list(theta.values()), allow_unused=True)
    theta_hat = {n: p.detach() - shift[n] - (0 if g is None else scale[n] * g) for (n, p), g in zip(theta.items(), grads)}
    direction, clean = scaled_clean_gradient(model, x_val, y_val, theta_hat, scale)
    return direction, float(clean)


class _MetaNetMethod:
    """Shared by mwnet and mlc: a meta network built in ``prepare`` and trained by Adam (weight decay
    1e-4, as Shu et al. 2019), checkpointed with its optimizer. One process only: under data
    parallelism each rank would step its own copy of the meta network on its own shard, and the
    copies would drift apart (nothing averages the meta-gradient over the ranks), so it is refused."""

    uses_meta_set = True
    trains_on_clean = False
    fits_clean_set = False  # the clean batch reaches the model only through the meta-gradient
    warmup_with_ce = True  # same warm-up as the L2B family, for a fair comparison

    def _one_process(self, world_size: int) -> None:
        if world_size > 1:
            raise L2BError(f"{self.name} runs in one process only (--nproc 1, not {world_size}): each rank would "
                           "train its own copy of the meta network on its shard, and the copies would drift apart")

    def _build(self, ctx, net: nn.Module) -> None:
        self._one_process(getattr(ctx.cfg, "nproc", 1))
        self.net = net.to(ctx.device)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=self.meta_lr, weight_decay=1e-4)
        if ctx.state is not None:
            self.net.load_state_dict(ctx.state["net"])
            self.meta_opt.load_state_dict(ctx.state["meta_opt"])

    def state_dict(self):
        return {"net": self.net.state_dict(), "meta_opt": self.meta_opt.state_dict()}

    def _meta_step(self, grads) -> None:
        for p, g in zip(self.net.parameters(), grads):
            p.grad = g
        self.meta_opt.step()


class WeightNet(nn.Module):
    """MW-Net's weighting function V(l; phi): a 1-hidden-1 MLP with a sigmoid output (Shu et al. 2019)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.net(losses[:, None]))[:, 0]  # (n,) -> (n,)


def mwnet_weights(v: Tensor, *, normalize: bool) -> Tensor:
    """The weights (n,) of MW-Net's summed training loss sum_i w_i l_i from V(l_i; phi) (n,).

    ``normalize=False``: w = V / n, the mean of the authors' ``MW-Net.py`` (their "stable version");
    ``normalize=True``: w = V / sum_j V_j, as their ``train_WRN-28-10_Meta_PGC.py`` does (all zero if
    every V underflows to 0, as their ``if norm_c != 0`` guard leaves it).
    """
    if not normalize:
        return v / len(v)
    total = v.sum()
    return v / torch.where(total > 0, total, torch.ones_like(total))


def mwnet_meta_grad(model, net, x, y, x_val, y_val, optimizer, *, normalize: bool = False):
    """dG/dphi of MW-Net's meta objective (Shu et al. 2019, eq. 4-5), exact and first order.

    theta_hat(phi) = theta' - s * grad sum_i w_i l_i(theta), w = `mwnet_weights` of V(l_i; phi) (eq. 4).
    The look-ahead is affine in w, so at the current weights dG/dw_i = -<s grad G(theta_hat), grad l_i(theta)>:
    one clean backward at theta_hat gives v = s grad G, one JVP of the per-sample losses along v gives
    all n inner products, and dG/dphi = sum_i dG/dw_i dw_i/dphi (a backward through V, and through the
    division by sum V when ``normalize``).

    Returns (grads, a list matching ``net.parameters()``; G(theta_hat), a float). Mutates nothing.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with meta_mode(model):
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")  # (n,)
        w = mwnet_weights(net(losses.detach()), normalize=normalize)  # (n,), a function of phi
        direction, clean = _lookahead_clean_direction(
            model, params, theta, (w.detach() * losses).sum(), x_val, y_val, optimizer)
        tangent, _ = directional_losses(model, x, y, params, direction)  # (2, n): row 0 = <grad l_i, v>
    return list(torch.autograd.grad(w, list(net.parameters()), grad_outputs=-tangent[0])), clean


@dataclass
class MWNet(_MetaNetMethod):
    """Meta-Weight-Net (Shu et al. 2019, "Meta-Weight-Net: learning an explicit mapping for sample
    weighting", Algorithm 1): per step, one Adam step of phi on the meta-gradient of the clean loss
    after a look-ahead (`mwnet_meta_grad`), then the real step on sum_i w_i l_i with the updated phi
    (eq. 6), w = `mwnet_weights`: V(l_i; phi) / n (``mwnet``, the authors' MW-Net.py) or
    V(l_i; phi) / sum_j V(l_j; phi) (``mwnet-sum``, their train_WRN-28-10_Meta_PGC.py). Reports
    alpha_i = w_i, beta = 0, so the trainer logs clean-vs-flipped means.
    """

    hidden: int
    meta_lr: float
    seed: int
    name: str = "mwnet"
    normalize: bool = False  # w = V / sum V instead of V / n

    def prepare(self, ctx):
        with torch.random.fork_rng(devices=[]):  # its own init stream: the model's stays the run's
            torch.manual_seed(self.seed + 4)
            self._build(ctx, WeightNet(self.hidden))

    def step(self, model, x, y, ctx):
        self._one_process(ctx.world_size)
        x_val, y_val = ctx.next_clean()
        grads, _ = mwnet_meta_grad(model, self.net, x, y, x_val, y_val, ctx.optimizer, normalize=self.normalize)
        self._meta_step(grads)
        logits = model(x)  # (n, K), the real forward
        losses = F.cross_entropy(logits, y, reduction="none")
        with torch.no_grad():
            w = mwnet_weights(self.net(losses.detach()), normalize=self.normalize)
        pseudo = logits.detach().argmax(dim=1)
        return StepResult((w * losses).sum(), w, torch.zeros_like(w), pseudo, logits)


@register_method("mwnet")
def _mwnet(meta_hidden: int = 100, meta_lr: float = 1e-3, seed: int = 0, **_):
    return MWNet(meta_hidden, meta_lr, seed)


@register_method("mwnet-sum")
def _mwnet_sum(meta_hidden: int = 100, meta_lr: float = 1e-3, seed: int = 0, **_):
    return MWNet(meta_hidden, meta_lr, seed, name="mwnet-sum", normalize=True)


class LabelCorrectionNet(nn.Module):
    """The label-correction network g(p, y~; phi) -> corrected soft label (n, K).

    Input: the classifier's (detached) softmax p (n, K) and the one-hot observed label (n, K); output
    softmax(MLP([p, onehot]) + c * onehot), c a learned scalar starting at 2 so that the first
    corrections lean to the observed label.
    """

    def __init__(self, num_classes: int, hidden: int = 100):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
        self.skip = nn.Parameter(torch.tensor(2.0))
        self.num_classes = num_classes

    def forward(self, probs: Tensor, y: Tensor) -> Tensor:
        onehot = F.one_hot(y, self.num_classes).to(probs.dtype)
        return torch.softmax(self.mlp(torch.cat([probs, onehot], dim=1)) + self.skip * onehot, dim=1)


def _directional_log_probs(model, x, params, direction) -> Tensor:
    """JVP of log softmax(model(x)) (n, K) along ``direction``; call inside ``meta_mode``."""
    primal = {n: p.detach() for n, p in params.items()}
    _, tangent = jvp(lambda th: F.log_softmax(functional_call(model, th, (x,)), dim=1), (primal,), (direction,))
    return tangent.detach()


def mlc_meta_grad(model, net, x, y, x_val, y_val, optimizer):
    """dG/dphi of the meta label-correction objective (Zheng et al. 2021, eq. 3-5), one-step look-ahead,
    exact and first order.

    theta_hat = theta' - s * grad L, L = -(1/n) sum_ik yc_ik log p_ik(theta), yc = g(p, y~; phi). L is
    linear in yc, so dG/dyc_ik = (1/n) <s grad G(theta_hat), grad log p_ik(theta)>: one clean backward
    and one JVP of the (n, K) log-probabilities; then a backward through g only.

    Returns (grads matching ``net.parameters()``, G(theta_hat) as a float). Mutates nothing.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with meta_mode(model):
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        logp = F.log_softmax(functional_call(model, theta, (x,)), dim=1)  # (n, K)
        yc = net(logp.detach().exp(), y)  # (n, K), a function of phi
        train_loss = -(yc.detach() * logp).sum(dim=1).mean()
        direction, clean = _lookahead_clean_direction(model, params, theta, train_loss, x_val, y_val, optimizer)
        dlogp = _directional_log_probs(model, x, params, direction)  # (n, K)
    return list(torch.autograd.grad(yc, list(net.parameters()), grad_outputs=dlogp / len(y))), clean


@dataclass
class MLC(_MetaNetMethod):
    """Meta Label Correction (Zheng et al. 2021, "Meta label correction for noisy label learning"),
    a simplified variant: per step, one Adam step of the label-correction network on the meta-gradient
    of the clean loss after a one-step look-ahead (`mlc_meta_grad`), then the real step on CE against
    the corrected soft labels of the updated network.

    Differences from the paper, for one trainer and one model: the correction network reads the
    classifier's own detached softmax instead of a separate feature encoder h(x); the look-ahead is one
    step (the paper's k-step variant with its gradient approximation is not implemented); the
    meta-gradient is exact rather than back-propagated through a copy of the model.
    """

    hidden: int
    meta_lr: float
    seed: int
    name: str = "mlc"

    def prepare(self, ctx):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 4)
            self._build(ctx, LabelCorrectionNet(ctx.data.num_classes, self.hidden))

    def step(self, model, x, y, ctx):
        self._one_process(ctx.world_size)
        x_val, y_val = ctx.next_clean()
        grads, _ = mlc_meta_grad(model, self.net, x, y, x_val, y_val, ctx.optimizer)
        self._meta_step(grads)
        logits = model(x)  # (n, K), the real forward
        with torch.no_grad():
            yc = self.net(torch.softmax(logits.detach(), dim=1), y)
        return StepResult(soft_cross_entropy(logits, yc), logits=logits)


@register_method("mlc")
def _mlc(meta_hidden: int = 100, meta_lr: float = 1e-3, seed: int = 0, **_):
    return MLC(meta_hidden, meta_lr, seed)
