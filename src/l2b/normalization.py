"""Meta-weight normalisation (Zhou et al. 2024, eq. 8-9, 13, 14, and the modes of Table 7): raw weights
(n,), (n,) -> (alpha, beta), over one process's batch or, with ``all_reduce``, the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import check_choice

__all__ = ["MODES", "NORMALIZATIONS", "normalize_weights"]

MODES = ("l2b", "beta0", "alpha0", "convex")
NORMALIZATIONS = ("sum", "softmax", "sigmoid")


def normalize_weights(
    raw_alpha: Tensor, raw_beta: Tensor, *, mode: str = "l2b", normalize: str = "sum", temperature: float = 10.0,
    all_reduce=None,
) -> tuple[Tensor, Tensor]:
    """Turn raw weights (n,), (n,) into (alpha, beta) under a mode and a normalisation.

    "l2b" normalises all 2n together (as the published code does); "beta0"/"alpha0" normalise one
    term over n and zero the other; "convex" normalises each sample's pair, so alpha_i + beta_i = 1
    (Table 7). ``normalize``: "sum" = clamp at 0 then divide by the sum (eq. 8-9), "sigmoid" (eq. 13),
    "softmax" with ``temperature`` (eq. 14).

    ``all_reduce(t, op)``, op "sum" or "max", returns the reduction of the 0-dim tensor t over all
    ranks (data-parallel training): the normalising constants then cover the global batch, as one
    process over all samples would. "convex" is per sample and needs none.
    """
    if mode == "l2b":
        w = _normalize(torch.cat([raw_alpha, raw_beta]), normalize, temperature, all_reduce)
        return w[: raw_alpha.numel()], w[raw_alpha.numel():]
    if mode == "beta0":
        return _normalize(raw_alpha, normalize, temperature, all_reduce), torch.zeros_like(raw_beta)
    if mode == "alpha0":
        return torch.zeros_like(raw_alpha), _normalize(raw_beta, normalize, temperature, all_reduce)
    if mode == "convex":
        w = _normalize_rows(torch.stack([raw_alpha, raw_beta], dim=1), normalize, temperature)
        return w[:, 0], w[:, 1]
    check_choice("mode", mode, MODES)
    raise AssertionError("unreachable")


def _local(t: Tensor, op: str) -> Tensor:
    return t


def _normalize(raw: Tensor, normalize: str, temperature: float, all_reduce=None) -> Tensor:
    """Normalise a 1-d group; the max and the sums go through ``all_reduce`` (one scalar each)."""
    reduce = all_reduce or _local
    if normalize in ("softmax", "sigmoid"):
        # eq. 14: softmax(raw / T); eq. 13: sigmoid(raw), here divided by its sum as the published code
        # does, = softmax(log sigmoid(raw)), exact where every sigmoid underflows to 0 (raw < -709 in
        # float64); the global max is subtracted for stability
        z = raw / temperature if normalize == "softmax" else F.logsigmoid(raw)
        e = torch.exp(z - reduce(z.max(), "max"))
        return e / reduce(e.sum(), "sum")
    w = raw.clamp_min(0)  # eq. 8
    total = reduce(w.sum(), "sum")
    # eq. 9, eps-guarded: a group with no positive weight gets all zeros, never 0/0
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(w))


def _normalize_rows(raw: Tensor, normalize: str, temperature: float) -> Tensor:
    """Normalise each row of (n, 2); under "sum" a row with no positive weight gets 0.5, 0.5."""
    if normalize == "softmax":
        return torch.softmax(raw / temperature, dim=1)
    if normalize == "sigmoid":  # sigmoid / row sum, in log space (see _normalize)
        return torch.softmax(F.logsigmoid(raw), dim=1)
    w = raw.clamp_min(0)
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), torch.full_like(w, 0.5))
