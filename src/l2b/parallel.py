"""Collectives of the data-parallel meta step; each is the identity in a single process.

- the clean gradient v is all-reduced and averaged (:func:`average_tensors`);
- the weights are normalised over the global batch (:func:`all_reduce_scalar`: one sum, or a max and a sum);
- per-sample records are gathered from every rank (:func:`all_gather_columns`), random states too
  (:func:`gather_objects`), and the ranks agree on stopping (:func:`agree_on_step`).

Process-group set-up, the DDP wrapper and the launcher are in ``l2b.train.distributed``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["launched", "world_size", "average_tensors", "all_reduce_scalar", "all_gather_columns", "gather_objects",
           "agree_on_step", "is_rank_zero", "rank_prefix"]


def launched() -> bool:
    """True inside a process started by torchrun (or `l2b train --nproc`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def average_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The mean over ranks of a dict of tensors, as one flattened all-reduce (one message, not one per tensor)."""
    if world_size() == 1:
        return tensors
    names = list(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, offset = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def all_reduce_scalar(t: Tensor, op: str) -> Tensor:
    """Sum or max of a 0-dim tensor over all ranks (a new tensor; ``t`` is left alone)."""
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out


def all_gather_columns(columns: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each (n,) column concatenated over the ranks in rank order, in one message (same n on every rank).

    The per-sample records of a step (indices, labels, weights): afterwards every rank holds the
    global batch's, as one process would. Integers travel as float64, exact below 2**53.
    """
    world = world_size()
    if world == 1:
        return columns
    stacked = torch.stack([c.detach().to(torch.float64) for c in columns])  # (columns, n)
    parts = [torch.empty_like(stacked) for _ in range(world)]
    dist.all_gather(parts, stacked)
    full = torch.cat(parts, dim=1)
    return tuple(full[i].to(c.dtype) for i, c in enumerate(columns))


def gather_objects(obj) -> list | None:
    """``obj`` of every rank, in rank order (a collective: all ranks call it); None in one process."""
    if world_size() == 1:
        return None
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree_on_step(finite: bool, signum: int | None, device: torch.device) -> tuple[bool, int | None]:
    """(every rank's loss is finite, the signal any rank received): all ranks then take the same branch.

    A rank that skipped its backward or stopped alone would leave the others waiting in an all-reduce.
    """
    if world_size() == 1:
        return finite, signum
    flags = torch.tensor([0 if finite else 1, signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0] == 0), int(flags[1]) or None


def is_rank_zero() -> bool:
    """True in a single process and in rank 0 of a launched one (who speaks for the run)."""
    return os.environ.get("RANK", "0") == "0"


def rank_prefix() -> str:
    """'[rank r] ' inside a launched process, '' otherwise (error lines say who failed)."""
    return f"[rank {os.environ['RANK']}] " if launched() and os.environ.get("WORLD_SIZE", "1") != "1" else ""
