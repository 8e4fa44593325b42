"""The paper's baselines (Tables 1-5, 8, 9) as policies over the one trainer.

Each method says what loss a batch gets; the trainer does the rest. A method that needs work before
the first epoch (a teacher, GLC's stage 1, a meta network) has a ``prepare(ctx)`` hook and a
``state_dict()`` that the trainer checkpoints. The meta methods (``mwnet``, ``mlc``) reuse the core's
look-ahead (`l2b._meta.lookahead_affine`, `meta_mode`) and its forward-mode directional derivatives:
their meta-gradients are exact and first order, like L2B's.

Hyperparameters are Config keys (`l2b._config.Config`): ``bootstrap_beta``, ``distill_lambda``,
``stage1_epochs``, ``mixup_alpha``, ``meta_lr``, ``meta_hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from ._meta import directional_losses, lookahead_affine, meta_mode
from ._methods import StepResult, register_method

__all__ = ["bootstrap_loss", "soft_cross_entropy", "estimate_corruption", "glc_loss", "mwnet_meta_grad",
           "mlc_meta_grad", "WeightNet", "LabelCorrectionNet"]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum_k target_ik log softmax(logits)_ik; logits, target (n, K)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@torch.no_grad()
def _predict(model: nn.Module, images, batch_size: int = 1000) -> Tensor:
    """Softmax outputs (N, K) in eval mode (running BatchNorm statistics)."""
    model.eval()
    out = [torch.softmax(model(images.batch(torch.arange(s, min(s + batch_size, len(images)), device=images.device))), 1)
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


class _Plain:
    """Defaults shared by the non-meta baselines: no clean batches, no warm-up switch."""

    uses_meta_set = False
    trains_on_clean = False
    warmup_with_ce = False


# ---------------------------------------------------------------- bootstrapping (Reed et al. 2014)

def bootstrap_loss(logits: Tensor, y: Tensor, beta: float, *, hard: bool) -> Tensor:
    """Bootstrapping loss of Reed et al. 2014 ("Training deep neural networks on noisy labels with
    bootstrapping"), mean over the batch; logits (n, K), y (n,).

    soft (their eq. 6): -sum_k (beta t_k + (1 - beta) q_k) log q_k = beta CE(q, y) + (1 - beta) H(q),
    with q = softmax(logits) not detached (the paper reads it as entropy regularisation);
    hard (their eq. 7): -sum_k (beta t_k + (1 - beta) z_k) log q_k, z = onehot(argmax q) (no gradient
    through the choice). beta = 1 is plain cross-entropy.
    """
    ce = F.cross_entropy(logits, y)
    if hard:
        other = F.cross_entropy(logits, logits.detach().argmax(dim=1))
    else:
        logq = F.log_softmax(logits, dim=1)
        other = -(logq.exp() * logq).sum(dim=1).mean()
    return beta * ce + (1.0 - beta) * other


@dataclass
class Bootstrap(_Plain):
    """Bootstrapping (Reed et al. 2014, eq. 6 soft / eq. 7 hard) with a fixed beta."""

    name: str
    beta: float
    hard: bool

    def step(self, model, x, y, ctx):
        logits = model(x)  # (n, K)
        return StepResult(bootstrap_loss(logits, y, self.beta, hard=self.hard), logits=logits)


@register_method("bootstrap-soft")
def _bootstrap_soft(bootstrap_beta: float | None = None, **_):
    return Bootstrap("bootstrap-soft", 0.95 if bootstrap_beta is None else bootstrap_beta, hard=False)


@register_method("bootstrap-hard")
def _bootstrap_hard(bootstrap_beta: float | None = None, **_):
    return Bootstrap("bootstrap-hard", 0.8 if bootstrap_beta is None else bootstrap_beta, hard=True)


# ---------------------------------------------------------------- distillation (Li et al. 2017)

@dataclass
class Distill(_Plain):
    """Distillation from a teacher trained on the clean set (Li et al. 2017, "Learning from noisy
    labels with distillation", eq. 2): target y_lam = lam * s + (1 - lam) * onehot(y), s the teacher's
    softmax output; loss = CE against y_lam = (1 - lam) CE(z, y) + lam * CE(z, s).

    ``lam`` here weighs the teacher (Li et al.'s lambda weighs the noisy label: ours is their 1 - lambda).
    Simplification: no knowledge graph; the teacher is the run's architecture trained with plain
    cross-entropy on the clean set for ``stage1_epochs`` epochs. lam = 0 is plain cross-entropy.
    """

    lam: float
    epochs: int
    name: str = "distill"
    teacher: nn.Module | None = field(default=None, repr=False)

    def prepare(self, ctx):
        self.teacher = ctx.new_model()
        if ctx.state is not None:
            self.teacher.load_state_dict(ctx.state["teacher"])
        else:
            ctx.fit(self.teacher, ctx.data.clean, ctx.data.y_clean, self.epochs)
        self.teacher.eval()  # its predictions use running statistics; it is never trained again

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()}

    def step(self, model, x, y, ctx):
        logits = model(x)  # (n, K)
        loss = (1.0 - self.lam) * F.cross_entropy(logits, y)
        if self.lam > 0:
            with torch.no_grad():
                s = torch.softmax(self.teacher(x), dim=1)  # (n, K)
            loss = loss + self.lam * soft_cross_entropy(logits, s)
        return StepResult(loss, logits=logits)


@register_method("distill")
def _distill(distill_lambda: float = 0.5, stage1_epochs: int = 10, **_):
    return Distill(distill_lambda, stage1_epochs)


# ---------------------------------------------------------------- GLC (Hendrycks et al. 2018)

def estimate_corruption(probs: Tensor, y_clean: Tensor, num_classes: int) -> Tensor:
    """The GLC estimate of the corruption matrix (Hendrycks et al. 2018, sec. 3, "Estimating C"):
    C[i, j] = mean over clean samples of true class i of p_hat(observed j | x).

    Parameters
    ----------
    probs : Tensor, shape (M, K)
        Softmax outputs on the clean set of a model trained on the noisy labels.
    y_clean : Tensor, shape (M,)
        True labels of the clean set.

    Returns
    -------
    Tensor, shape (K, K)
        Rows = true class, columns = observed class, rows sum to one (l2b's convention); a class with
        no clean sample gets the identity row.
    """
    c = torch.eye(num_classes, dtype=probs.dtype, device=probs.device)
    for i in range(num_classes):
        mask = y_clean == i
        if mask.any():
            c[i] = probs[mask].mean(dim=0)
    return c


def glc_loss(logits: Tensor, y: Tensor, corruption: Tensor) -> Tensor:
    """Per-sample corrected loss -log sum_i softmax(logits)_i C[i, y] (Hendrycks et al. 2018, eq. in
    sec. 3, "Training with the corrected loss"), computed as a log-sum-exp; logits (n, K) -> (n,)."""
    log_c = torch.log(corruption.clamp_min(1e-12)).to(logits.dtype)  # (K, K)
    return -torch.logsumexp(F.log_softmax(logits, dim=1) + log_c[:, y].T, dim=1)


@dataclass
class GLC:
    """Gold Loss Correction (Hendrycks et al. 2018, "Using trusted data to train deep networks on labels
    corrupted by severe noise"). Stage 1 (``prepare``): a model trained on the noisy labels for
    ``stage1_epochs`` epochs; C estimated on the clean set from its softmax. Stage 2 (the run): a fresh
    model trained on noisy batches with the corrected loss and on clean batches with plain
    cross-entropy, one forward of both, mean over the n + m samples.
    """

    epochs: int
    name: str = "glc"
    uses_meta_set: bool = True  # draws a clean batch every step
    trains_on_clean: bool = False
    warmup_with_ce: bool = False
    corruption: Tensor | None = None

    def prepare(self, ctx):
        if ctx.state is not None:
            self.corruption = ctx.state["corruption"].to(ctx.device)
            return
        stage1 = ctx.new_model()
        ctx.fit(stage1, ctx.data.train, ctx.data.y_observed, self.epochs)
        probs = _predict(stage1, ctx.data.clean)
        self.corruption = estimate_corruption(probs, ctx.data.y_clean, ctx.data.num_classes)

    def state_dict(self):
        return {"corruption": self.corruption}

    def step(self, model, x, y, ctx):
        x_val, y_val = ctx.next_clean()
        logits = model(torch.cat([x, x_val]))  # (n + m, K)
        z, z_val = logits[: len(y)], logits[len(y):]
        losses = torch.cat([glc_loss(z, y, self.corruption), F.cross_entropy(z_val, y_val, reduction="none")])
        return StepResult(losses.mean(), logits=z)


@register_method("glc")
def _glc(stage1_epochs: int = 10, **_):
    return GLC(stage1_epochs)


# ---------------------------------------------------------------- mixup (Zhang et al. 2018)

@dataclass
class Mixup(_Plain):
    """mixup (Zhang et al. 2018, "mixup: Beyond empirical risk minimization", eq. 1): lam ~ Beta(a, a),
    x~ = lam x_i + (1 - lam) x_j, loss = lam CE(f(x~), y_i) + (1 - lam) CE(f(x~), y_j) (the published
    code's form of CE against the mixed target), j a permutation of the batch. a = 0: lam = 1, plain CE.
    """

    alpha: float
    seed: int
    name: str = "mixup"
    rng: np.random.Generator = field(default=None, repr=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed + 3)  # its own stream: the data order stays the run's

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def prepare(self, ctx):
        if ctx.state is not None:
            self.rng.bit_generator.state = ctx.state["rng"]

    def step(self, model, x, y, ctx):
        lam = float(self.rng.beta(self.alpha, self.alpha)) if self.alpha > 0 else 1.0
        perm = torch.as_tensor(self.rng.permutation(len(y)), device=y.device)
        logits = model(lam * x + (1.0 - lam) * x[perm])  # (n, K)
        loss = lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])
        return StepResult(loss, logits=logits)


@register_method("mixup")
def _mixup(mixup_alpha: float = 1.0, seed: int = 0, **_):
    return Mixup(mixup_alpha, seed)


# ---------------------------------------------------------------- meta methods: shared pieces

def _lookahead_clean_direction(model, params, theta, train_loss, x_val, y_val, optimizer):
    """v = s * grad G(theta_hat), theta_hat = theta' - s * grad train_loss(theta): the optimizer's own
    look-ahead (`lookahead_affine`) from the current weights. Call inside ``meta_mode``.

    Returns the direction v (dict name -> tensor) and the clean loss G(theta_hat) (a float).
    """
    shift, scale = lookahead_affine(params, optimizer)
    grads = torch.autograd.grad(train_loss, list(theta.values()), allow_unused=True)
    theta_hat = {n: (p.detach() - shift[n] - (0 if g is None else scale[n] * g)).requires_grad_(True)
                 for (n, p), g in zip(theta.items(), grads)}
    clean = F.cross_entropy(functional_call(model, theta_hat, (x_val,)), y_val)
    grads_hat = torch.autograd.grad(clean, list(theta_hat.values()), allow_unused=True)
    direction = {n: torch.zeros_like(p) if g is None else g * scale[n] for (n, p), g in zip(params.items(), grads_hat)}
    return direction, float(clean.detach())


class _MetaNetMethod:
    """Shared by mwnet and mlc: a meta network built in ``prepare`` and trained by Adam (weight decay
    1e-4, as Shu et al. 2019), checkpointed with its optimizer."""

    uses_meta_set = True
    trains_on_clean = False
    warmup_with_ce = True  # same warm-up as the L2B family, for a fair comparison

    def _build(self, ctx, net: nn.Module) -> None:
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


# ---------------------------------------------------------------- MW-Net (Shu et al. 2019)

class WeightNet(nn.Module):
    """MW-Net's weighting function V(l; phi): a 1-hidden-1 MLP with a sigmoid output (Shu et al. 2019)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.net(losses[:, None]))[:, 0]  # (n,) -> (n,)


def mwnet_meta_grad(model, net, x, y, x_val, y_val, optimizer):
    """dG/dphi of MW-Net's meta objective (Shu et al. 2019, eq. 4-5), exact and first order.

    theta_hat(phi) = theta' - s * grad (1/n) sum_i w_i l_i(theta), w_i = V(l_i; phi) (eq. 4). The look-ahead
    is affine in w, so at the current weights dG/dw_i = -(1/n) <s grad G(theta_hat), grad l_i(theta)>:
    one clean backward at theta_hat gives v = s grad G, one JVP of the per-sample losses along v gives
    all n inner products, and dG/dphi = sum_i dG/dw_i dw_i/dphi (a backward through V only).

    Returns (grads, a list matching ``net.parameters()``; G(theta_hat), a float). Mutates nothing.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with meta_mode(model):
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        losses = F.cross_entropy(functional_call(model, theta, (x,)), y, reduction="none")  # (n,)
        w = net(losses.detach())  # (n,), a function of phi
        direction, clean = _lookahead_clean_direction(
            model, params, theta, (w.detach() * losses).mean(), x_val, y_val, optimizer)
        tangent, _ = directional_losses(model, x, y, params, direction)  # (2, n): row 0 = <grad l_i, v>
    dg_dw = -tangent[0] / len(y)
    return list(torch.autograd.grad(w, list(net.parameters()), grad_outputs=dg_dw)), clean


@dataclass
class MWNet(_MetaNetMethod):
    """Meta-Weight-Net (Shu et al. 2019, "Meta-Weight-Net: learning an explicit mapping for sample
    weighting", Algorithm 1): per step, one Adam step of phi on the meta-gradient of the clean loss
    after a look-ahead (`mwnet_meta_grad`), then the real step on (1/n) sum_i V(l_i; phi) l_i with the
    updated phi (eq. 6). Reports alpha_i = V(l_i)/n, beta = 0, so the trainer logs clean-vs-flipped means.
    """

    hidden: int
    meta_lr: float
    seed: int
    name: str = "mwnet"

    def prepare(self, ctx):
        with torch.random.fork_rng(devices=[]):  # its own init stream: the model's stays the run's
            torch.manual_seed(self.seed + 4)
            self._build(ctx, WeightNet(self.hidden))

    def step(self, model, x, y, ctx):
        x_val, y_val = ctx.next_clean()
        grads, _ = mwnet_meta_grad(model, self.net, x, y, x_val, y_val, ctx.optimizer)
        self._meta_step(grads)
        logits = model(x)  # (n, K), the real forward
        losses = F.cross_entropy(logits, y, reduction="none")
        with torch.no_grad():
            w = self.net(losses.detach())
        pseudo = logits.detach().argmax(dim=1)
        return StepResult((w * losses).mean(), w / len(y), torch.zeros_like(w), pseudo, logits)


@register_method("mwnet")
def _mwnet(meta_hidden: int = 100, meta_lr: float = 1e-3, seed: int = 0, **_):
    return MWNet(meta_hidden, meta_lr, seed)


# ---------------------------------------------------------------- MLC (Zheng et al. 2021)

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

