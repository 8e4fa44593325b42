"""The L2B meta-weights (Zhou et al., CVPR 2024, eq. 5-9, 13, 14), computed exactly and first-order.

docs/METHOD.md maps every equation of the method to the lines below and lists where the code follows
the published implementation rather than the paper's text.

Notation (paper -> code): theta -> the model's parameters; lambda -> the optimizer's lr; f_i = CE(z_i, y_i)
and g_i = CE(z_i, p_i) with p_i = argmax z_i; G -> clean-batch cross-entropy, the mean over the m clean images
(Algorithm 1) or their sum (eq. 7, ``meta_loss="sum"``); alpha_i, beta_i ->
``MetaWeights.alpha``, ``MetaWeights.beta``.

The look-ahead step is the optimizer's own update applied to grad sum_i alpha_i f_i + beta_i g_i
(as the published code's differentiable optimizer copy does). For torch.optim.SGD this is affine in
the gradient: theta_hat = theta' - s * grad(...), with theta' the point the step reaches with a zero
gradient (momentum and weight decay only) and s = lr * c, c the gradient's coefficient in the update.
Hence, at alpha = beta = 0 (paper Appendix B.2, eq. 23 and 28),

    raw_alpha_i = -dG/dalpha_i = < s * grad G(theta'), grad f_i(theta) >
    raw_beta_i  = -dG/dbeta_i  = < s * grad G(theta'), grad g_i(theta) >.

With v = s * grad G(theta') (one forward + backward of the clean batch), all 2n inner products are a
single forward-mode pass along v (the loss tangents follow from the logits' tangent in closed form):
no double backward, no per-sample gradients. In training, that pass is the real forward itself
(``weighted_forward``), so an L2B step costs a plain step plus one clean forward/backward plus the
tangent part of the forward.
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

from .errors import L2BError, check_choice
from .parallel import all_reduce_scalar, average_tensors, world_size
from .fastnorm import fast_tangents
from .normalization import MODES, NORMALIZATIONS, normalize_weights

__all__ = ["MetaWeights", "meta_weights", "normalize_weights", "MODES", "NORMALIZATIONS", "META_GRADS", "META_LOSSES",
           "PSEUDO_SOURCES"]

META_GRADS = ("exact", "fd")  # forward-mode JVP | one-sided finite difference along v
META_LOSSES = ("mean", "sum")  # G over the m clean images: Algorithm 1 and the published code | eq. 7
PSEUDO_SOURCES = ("train", "eval")  # p_i from the train-mode forward (batch statistics) | an eval-mode one


@dataclass(frozen=True)
class MetaWeights:
    """Per-sample weights of one training batch.

    Attributes
    ----------
    alpha : Tensor, shape (n,)
        Weight of the observed-label loss f_i (paper eq. 9 under ``normalize="sum"``).
    beta : Tensor, shape (n,)
        Weight of the pseudo-label loss g_i.
    pseudo : Tensor, shape (n,), int64
        The pseudo-labels p_i = argmax_k z_ik, taken at the current parameters, from the train-mode
        logits or, with ``pseudo_from="eval"``, from an eval-mode forward.
    raw_alpha, raw_beta : Tensor, shape (n,)
        -dG/dalpha_i and -dG/dbeta_i at alpha = beta = 0, before normalisation. They include the
        learning rate (as the published code's -grad_eps does): higher = the sample's term lowers the
        clean loss more.
    """

    alpha: Tensor
    beta: Tensor
    pseudo: Tensor
    raw_alpha: Tensor
    raw_beta: Tensor


def meta_weights(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    mode: str = "l2b",
    normalize: str = "sum",
    temperature: float = 10.0,
    meta_grad: str = "exact",
    distributed: bool = False,
    logits: Tensor | None = None,
    meta_loss: str = "mean",
    pseudo_from: str = "train",
) -> MetaWeights:
    """Compute the L2B weights alpha, beta of a training batch (paper eq. 5-9).

    Nothing is mutated: afterwards the model's parameters, buffers (BatchNorm running statistics),
    train/eval modes and the optimizer's state are exactly as before. Every forward inside runs in
    train mode with batch statistics, as the real training step does.

    Parameters
    ----------
    model : nn.Module
        The classifier; ``model(x)`` returns logits of shape (n, K). Dropout or other randomness in
        the forward makes the weights stochastic.
    x : Tensor, shape (n, ...)
        Training inputs.
    y : Tensor, shape (n,), int64
        Observed (possibly wrong) labels in [0, K).
    x_val : Tensor, shape (m, ...)
        Clean (trusted) inputs.
    y_val : Tensor, shape (m,), int64
        Their labels.
    optimizer : torch.optim.SGD, optional
        The optimizer of the real step: the look-ahead (eq. 5-6; lambda is its lr) uses its lr,
        momentum buffers, dampening, Nesterov flag and weight decay, per parameter group, as the
        published code's differentiable optimizer copy does (the paper writes a plain gradient step).
        Parameters it does not hold stay fixed in the look-ahead. ``None`` means a plain gradient
        step with lr = 1 from theta.
    mode : {"l2b", "beta0", "alpha0", "convex"}, default="l2b"
        The rows of the paper's Table 7. "l2b": alpha, beta >= 0 normalised together over all 2n;
        "beta0": beta = 0 (this is L2RW, Ren et al. 2018); "alpha0": alpha = 0 (pseudo-labels only);
        "convex": alpha_i + beta_i = 1 for each sample (Appendix B.1: then the loss is Reed et al.'s
        bootstrapping loss with a learned per-sample mix; a sample with no evidence gets 0.5 and 0.5).
    normalize : {"sum", "softmax", "sigmoid"}, default="sum"
        "sum": clamp at 0 and divide by the sum (eq. 8-9; all zero stays all zero, never NaN);
        "softmax": softmax of raw / temperature (eq. 14); "sigmoid": sigmoid(raw) divided by its sum
        (eq. 13). The raw weights include lr, which cancels under "sum" only.
    temperature : float, default=10.0
        Softmax temperature T (the paper uses T = 10 on ISIC2019).
    meta_grad : {"exact", "fd"}, default="exact"
        "exact": the inner products by one forward-mode JVP. "fd": an approximation, the one-sided
        finite difference (f(theta + h v) - f(theta)) / h of the per-sample losses along v, one
        forward without autograd instead of the JVP (see :func:`finite_difference_losses`).
    distributed : bool, default=False
        Data-parallel training (torch.distributed initialised): the clean gradient is averaged over
        the ranks and the weights are normalised over the global batch, so every rank computes its
        share of what one process would compute over all ranks' samples.
    logits : Tensor, shape (n, K), optional
        ``model(x)`` at the current parameters in train mode, if the caller already has it (the
        real step's forward): "fd" then skips its own forward at theta. Ignored by "exact".
    meta_loss : {"mean", "sum"}, default="mean"
        The clean loss G over the m clean images: their mean (Algorithm 1, the published code) or
        their sum (eq. 7). The raw weights of "sum" are m times those of "mean": the factor cancels
        under ``normalize="sum"`` and sharpens softmax/sigmoid weights.
    pseudo_from : {"train", "eval"}, default="train"
        Where p_i comes from: the argmax of the train-mode logits (batch statistics, the published
        code) or of an eval-mode forward (BatchNorm's running statistics, no dropout) of the same
        batch without gradient, which moves no running statistics. f_i and g_i are the train-mode
        losses either way; only the choice of p_i differs.

    Returns
    -------
    MetaWeights
        Detached tensors on x's device.

    Examples
    --------
    >>> import torch, l2b
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> w = l2b.meta_weights(model, x, y, torch.randn(5, 4), torch.randint(0, 3, (5,)), optimizer=opt)
    >>> float(w.alpha.sum() + w.beta.sum())  # doctest: +SKIP
    1.0
    """
    check_choice("mode", mode, MODES)
    check_choice("normalize", normalize, NORMALIZATIONS)
    check_choice("meta_grad", meta_grad, META_GRADS)
    check_choice("meta_loss", meta_loss, META_LOSSES)
    check_choice("pseudo_from", pseudo_from, PSEUDO_SOURCES)
    if not temperature > 0:
        raise L2BError(f"temperature must be > 0, got {temperature}")
    for name, labels, inputs in (("y", y, x), ("y_val", y_val, x_val)):
        if labels.ndim != 1 or labels.shape[0] != inputs.shape[0]:
            raise L2BError(f"{name} must have shape ({inputs.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype != torch.long:
            raise L2BError(f"{name} must be int64 class indices, got {labels.dtype}")
    reduce_direction, all_reduce = _reducers(distributed)
    raw_alpha, raw_beta, pseudo = raw_meta_weights(model, x, y, x_val, y_val, optimizer=optimizer,
                                                   reduce_direction=reduce_direction, meta_grad=meta_grad,
                                                   logits=logits, meta_loss=meta_loss, pseudo_from=pseudo_from)
    alpha, beta = normalize_weights(raw_alpha, raw_beta, mode=mode, normalize=normalize, temperature=temperature,
                                    all_reduce=all_reduce)
    return MetaWeights(alpha, beta, pseudo, raw_alpha, raw_beta)


def raw_meta_weights(model, x, y, x_val, y_val, *, optimizer=None, reduce_direction=None, meta_grad="exact",
                     logits=None, meta_loss="mean", pseudo_from="train"):
    """(raw_alpha, raw_beta, pseudo), each (n,): the unnormalised -dG/dalpha, -dG/dbeta at 0.

    ``reduce_direction``, if given, is applied to the scaled clean gradient v (a dict name -> tensor)
    before the JVP; data-parallel training all-reduces it there so every rank uses the global v.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pseudo = eval_pseudo_labels(model, x) if pseudo_from == "eval" else None
    with meta_mode(model):
        direction = clean_direction(model, x_val, y_val, params, optimizer, reduce_direction, meta_loss=meta_loss)
        if meta_grad == "fd":
            raw, pseudo = finite_difference_losses(model, x, y, params, direction, logits=logits, pseudo=pseudo)
        else:
            raw, pseudo = directional_losses(model, x, y, params, direction, pseudo=pseudo)
    return raw[0], raw[1], pseudo


def weighted_forward(model, x, y, x_val, y_val, *, optimizer=None, mode="l2b", normalize="sum",
                     temperature=10.0, distributed=False, wrapper=None, meta_loss="mean", pseudo_from="train"):
    """The training step's forward: (MetaWeights, logits (n, K) with their autograd graph).

    Equal to ``meta_weights`` followed by ``model(x)``, one forward cheaper: the real forward (the
    one that moves BatchNorm running statistics, in the model's current mode) carries the tangent
    along v, so the same pass yields the logits to backpropagate and the 2n inner products.
    ``wrapper`` (e.g. DistributedDataParallel around ``model``) runs that real forward, so its
    gradient hooks see the backward; the clean pass (and the eval-mode pass of ``pseudo_from="eval"``)
    always uses ``model`` itself. ``distributed``, ``meta_loss``, ``pseudo_from`` as in :func:`meta_weights`.
    """
    reduce_direction, all_reduce = _reducers(distributed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pseudo = eval_pseudo_labels(model, x) if pseudo_from == "eval" else None
    with meta_mode(model):
        direction = clean_direction(model, x_val, y_val, params, optimizer, reduce_direction, meta_loss=meta_loss)
    logits, tangent = dual_forward(model if wrapper is None else wrapper, x, params, direction)
    raw, pseudo = loss_tangents(logits.detach(), tangent, y, pseudo)
    alpha, beta = normalize_weights(raw[0], raw[1], mode=mode, normalize=normalize, temperature=temperature,
                                    all_reduce=all_reduce)
    return MetaWeights(alpha, beta, pseudo, raw[0], raw[1]), logits


def _reducers(distributed: bool):
    """(reduce_direction, all_reduce) for data-parallel training, (None, None) in one process."""
    if not distributed:
        return None, None
    return average_tensors, all_reduce_scalar


def clean_direction(model, x_val, y_val, params, optimizer, reduce_direction=None, *,
                    meta_loss="mean") -> dict[str, Tensor]:
    """v = s * grad G(theta'): the clean-batch gradient at the look-ahead point, scaled per parameter.

    G is the mean clean cross-entropy (averaged over the ranks by ``reduce_direction``); under
    ``meta_loss="sum"`` (eq. 7) the sum, i.e. the mean times the global clean batch size m.
    """
    shift, scale = lookahead_affine(params, optimizer)
    if meta_loss == "sum":
        m = len(y_val) * world_size()  # every rank holds an equal share of the clean batch
        scale = {n: s * m for n, s in scale.items()}
    theta_prime = {n: p.detach() - shift[n] for n, p in params.items()}
    direction, _ = scaled_clean_gradient(model, x_val, y_val, theta_prime, scale)
    return reduce_direction(direction) if reduce_direction is not None else direction


def scaled_clean_gradient(model, x_val, y_val, point: dict[str, Tensor], scale: dict[str, float]):
    """(v, G): G the mean clean cross-entropy at the parameters ``point``, v = scale * grad G there.

    ``point`` maps parameter names to values (theta' for L2B; the meta-network baselines pass their
    own look-ahead point, a gradient step past theta'). Call inside :func:`meta_mode`.
    """
    point = {n: t.detach().requires_grad_(True) for n, t in point.items()}
    clean_loss = F.cross_entropy(functional_call(model, point, (x_val,)), y_val)
    grads = torch.autograd.grad(clean_loss, list(point.values()), allow_unused=True)
    direction = {n: torch.zeros_like(p) if g is None else g * scale[n] for (n, p), g in zip(point.items(), grads)}
    return direction, clean_loss.detach()


def dual_forward(model, x, params, direction) -> tuple[Tensor, Tensor]:
    """One forward with parameters theta + dual part v: (logits, d logits / dt along v), each (n, K).

    The logits keep the reverse-mode graph to the parameters; the tangent is detached. ``model`` may
    wrap the module that ``params`` are named after (DDP's "module." prefix): they are matched by identity.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    with fwAD.dual_level(), fast_tangents(model):  # closed-form tangents of BatchNorm, conv, linear
        dual = {names[id(p)]: fwAD.make_dual(p, direction[n]) for n, p in params.items()}
        logits, tangent = fwAD.unpack_dual(functional_call(model, dual, (x,)))
    return logits, tangent.detach()


def loss_tangents(logits: Tensor, tangent: Tensor, y: Tensor, pseudo: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Tangents of f_i = CE(z_i, y_i) and g_i = CE(z_i, p_i): ((2, n), pseudo (n,)).

    p_i = argmax z_i unless ``pseudo`` (n,) is given. d CE(z, c) = <softmax(z) - onehot(c), dz>, so
    no forward-mode pass through the loss is needed.
    """
    probs = torch.softmax(logits, dim=1)  # (n, K)
    if pseudo is None:
        pseudo = probs.argmax(dim=1)  # an index: no gradient flows through the choice
    expected = (probs * tangent).sum(dim=1)  # (n,)
    f = expected - tangent.gather(1, y[:, None])[:, 0]
    g = expected - tangent.gather(1, pseudo[:, None])[:, 0]
    return torch.stack([f, g]), pseudo


def directional_losses(model, x, y, params, direction, pseudo=None):
    """JVP of the per-sample losses (f, g) along ``direction``: returns ((2, n) tangents, pseudo)."""
    with torch.no_grad():
        logits, tangent = dual_forward(model, x, params, direction)
    return loss_tangents(logits, tangent, y, pseudo)


def eval_pseudo_labels(model: nn.Module, x: Tensor) -> Tensor:
    """(n,) argmax of an eval-mode forward (running statistics, no dropout) without gradient.

    Eval-mode BatchNorm reads its running statistics and leaves them alone; every module's mode is
    restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x).argmax(dim=1)
    finally:
        for m, training in modes:
            m.training = training


def _per_sample_losses(logits: Tensor, y: Tensor, pseudo: Tensor) -> Tensor:
    """(2, n): f_i = CE(z_i, y_i) and g_i = CE(z_i, p_i), in float32 or wider (even under autocast)."""
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.stack([F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(logits, pseudo, reduction="none")])


def finite_difference_losses(model, x, y, params, direction, *, logits=None, pseudo=None):
    """One-sided finite difference of the per-sample losses along ``direction`` (an approximation).

    Returns ((2, n) estimates of <grad f_i, v>, <grad g_i, v>, pseudo), from
    (f(theta + h v) - f(theta)) / h. The step h = sqrt(eps) * ||theta|| / ||v||, with eps the
    machine epsilon of the forward's precision (autocast's dtype when autocast is on): a relative
    move of sqrt(eps) balances the truncation error (O(h)) against rounding (O(eps / h)).
    ``logits`` (n, K) at theta, in train mode, saves the forward at theta (the real step has it);
    ``pseudo`` (n,) replaces their argmax as p_i.
    BatchNorm uses batch statistics and leaves running statistics alone (the caller's meta_mode).
    """
    with torch.no_grad():
        primal = {n: p.detach() for n, p in params.items()}
        if logits is None:
            logits = functional_call(model, primal, (x,))
        logits = logits.detach()
        pseudo = logits.argmax(dim=1) if pseudo is None else pseudo
        base = _per_sample_losses(logits, y, pseudo)  # (2, n)
        norm_theta = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in primal.values()]))
        norm_v = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.float()) for v in direction.values()]))
        if not norm_v > 0:  # no clean signal: every inner product is 0
            return torch.zeros_like(base), pseudo
        h = math.sqrt(_compute_eps(x, primal)) * float(norm_theta.clamp_min(1.0)) / float(norm_v)
        moved = {n: p + h * direction[n].to(p.dtype) for n, p in primal.items()}
        ahead = _per_sample_losses(functional_call(model, moved, (x,)), y, pseudo)
    return ((ahead - base) / h).to(base.dtype), pseudo


def _compute_eps(x: Tensor, params: dict[str, Tensor]) -> float:
    """Machine epsilon of the forward pass: autocast's dtype if on for x's device, else the parameters'."""
    dtype = next(iter(params.values())).dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return torch.finfo(dtype).eps


def lookahead_affine(params: dict[str, Tensor], optimizer) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The look-ahead step as theta_hat = theta - shift - scale * grad, per parameter.

    For torch.optim.SGD (d = grad + wd * theta; buf = mu * buf + (1 - dampening) * d, or d on the
    first step; update = buf, or d + mu * buf with Nesterov; theta -= lr * update) the update is
    affine in grad; ``shift`` is lr times the update at grad = 0, ``scale`` the coefficient of grad.
    """
    if optimizer is None:
        return {n: torch.zeros_like(p) for n, p in params.items()}, {n: 1.0 for n in params}
    if not isinstance(optimizer, torch.optim.SGD):
        raise L2BError(
            f"meta_weights looks ahead with torch.optim.SGD only, got {type(optimizer).__name__}; "
            "pass optimizer=None for a plain gradient step"
        )
    by_id = {}
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise L2BError("meta_weights does not support SGD(maximize=True)")
        for p in group["params"]:
            by_id[id(p)] = group
    shift, scale = {}, {}
    for n, p in params.items():
        group = by_id.get(id(p))
        if group is None:  # not optimised: it does not move in the look-ahead either
            shift[n], scale[n] = torch.zeros_like(p), 0.0
            continue
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        damp, nesterov = group["dampening"], group["nesterov"]
        lr = float(lr)
        decay = wd * p.detach()
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if mu != 0 else None
        if mu == 0:
            update0, coef = decay, 1.0
        elif buf is None:  # first step: buf = d, no dampening
            update0, coef = (decay * (1 + mu), 1.0 + mu) if nesterov else (decay, 1.0)
        else:
            buf0 = mu * buf + (1 - damp) * decay
            update0, coef = ((decay + mu * buf0), 1.0 + mu * (1 - damp)) if nesterov else (buf0, 1.0 - damp)
        shift[n], scale[n] = lr * update0, lr * coef
    return shift, scale


@contextlib.contextmanager
def meta_mode(model: nn.Module):
    """Train mode with batch statistics, without touching BatchNorm running statistics.

    ``track_running_stats = False`` makes BatchNorm normalise by the batch (keeping the exact
    cross-sample coupling) and leave running_mean/var/num_batches_tracked alone, so only the real
    forward of a step moves them.
    """
    modes = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    synced = [m for m in norms if isinstance(m, nn.SyncBatchNorm)]
    try:
        model.train()
        for m in norms:
            m.track_running_stats = False
        for m in synced:  # per-rank batch statistics: SyncBatchNorm has no forward-mode derivative
            m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)
        yield model
    finally:
        for m in synced:
            del m.forward
        for m, flag in zip(norms, tracked):
            m.track_running_stats = flag
        for m, training in modes:
            m.training = training
