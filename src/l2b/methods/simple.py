"""The paper's non-meta baselines (Tables 1-5): bootstrapping, distillation, GLC, mixup.

Each method says what loss a batch gets; the trainer does the rest. A method that needs work before
the first epoch (a teacher, GLC's stage 1) has a ``prepare(ctx)`` hook and a ``state_dict()`` that
the trainer checkpoints. Hyperparameters are Config keys: ``bootstrap_beta``, ``distill_lambda``,
``stage1_epochs``, ``mixup_alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import predict_probs
from .base import StepResult, register_method

__all__ = ["bootstrap_loss", "soft_cross_entropy", "estimate_corruption", "glc_loss", "PlainMethod"]


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum_k target_ik log softmax(logits)_ik; logits, target (n, K)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class PlainMethod:
    """Defaults shared by the non-meta baselines: no clean batches, no warm-up switch."""

    uses_meta_set = False
    trains_on_clean = False
    fits_clean_set = False  # distill's teacher fits the clean set, the student it selects does not
    warmup_with_ce = False


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
class Bootstrap(PlainMethod):
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


@dataclass
class Distill(PlainMethod):
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
    fits_clean_set: bool = True  # ... and trains on it with plain cross-entropy
    warmup_with_ce: bool = False
    corruption: Tensor | None = None

    def prepare(self, ctx):
        if ctx.state is not None:
            self.corruption = ctx.state["corruption"].to(ctx.device)
            return
        stage1 = ctx.new_model()
        ctx.fit(stage1, ctx.data.train, ctx.data.y_observed, self.epochs)
        probs = predict_probs(stage1, ctx.data.clean, 1000)
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


@dataclass
class Mixup(PlainMethod):
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
