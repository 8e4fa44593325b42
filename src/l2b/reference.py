"""A slow, obviously-correct reference for the meta-weights: double backward through a functional
look-ahead that re-implements torch.optim.SGD's update literally (as the published code does).

Used as the oracle of the fast path in the tests and as the baseline of `l2b bench step`; never in
training."""

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .meta import meta_mode, normalize_weights


def sgd_lookahead(theta, grads, group_and_buf):
    """theta_hat per parameter name, differentiable in grads. group_and_buf(name) -> (group, buf);
    group None means a plain gradient step with lr 1."""
    out = {}
    for name, p in theta.items():
        group, buf = group_and_buf(name)
        if group is None:
            out[name] = p - grads[name]
            continue
        d = grads[name] + group["weight_decay"] * p
        mu = group["momentum"]
        if mu != 0:
            buf = d if buf is None else mu * buf + (1 - group["dampening"]) * d
            d = d + mu * buf if group["nesterov"] else buf
        out[name] = p - group["lr"] * d
    return out


def reference_meta_weights(model, x, y, x_val, y_val, *, optimizer=None, mode="l2b", normalize="sum", temperature=10.0,
                           meta_loss="mean", pseudo_from="train"):
    """(alpha, beta, pseudo, raw_alpha, raw_beta) as :func:`l2b.meta_weights` defines them, the slow way.

    ``meta_loss`` is the reduction of the clean loss G ("mean" or "sum"); ``pseudo_from="eval"``
    takes p_i from an eval-mode forward (the model's modes are restored).
    """
    named = dict(model.named_parameters())
    eval_pseudo = None
    if pseudo_from == "eval":
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        with torch.no_grad():
            eval_pseudo = model(x).argmax(1)
        for m, training in modes:
            m.training = training

    def group_and_buf(name):
        if optimizer is None:
            return None, None
        p = named[name]
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        return group, optimizer.state.get(p, {}).get("momentum_buffer")

    with meta_mode(model):
        theta = {n: p.detach().clone().requires_grad_(True) for n, p in named.items()}
        logits = functional_call(model, theta, (x,))
        pseudo = logits.detach().argmax(1) if eval_pseudo is None else eval_pseudo
        eps_a = torch.zeros(len(y), dtype=logits.dtype, device=logits.device, requires_grad=True)
        eps_b = torch.zeros(len(y), dtype=logits.dtype, device=logits.device, requires_grad=True)
        loss = (eps_a * F.cross_entropy(logits, y, reduction="none")).sum() + (
            eps_b * F.cross_entropy(logits, pseudo, reduction="none")
        ).sum()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()), create_graph=True)))
        theta_hat = sgd_lookahead(theta, grads, group_and_buf)
        clean = F.cross_entropy(functional_call(model, theta_hat, (x_val,)), y_val, reduction=meta_loss)
        ga, gb = torch.autograd.grad(clean, [eps_a, eps_b])
    raw_a, raw_b = -ga.detach(), -gb.detach()
    alpha, beta = normalize_weights(raw_a, raw_b, mode=mode, normalize=normalize, temperature=temperature)
    return alpha, beta, pseudo, raw_a, raw_b
