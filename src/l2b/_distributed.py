"""Data-parallel helpers: process group set-up, the meta step's all-reduces, launching K processes.

`torchrun --nproc_per_node K -m l2b train ...` (or `l2b train --nproc K`, which runs the same launcher)
starts K processes; each trains on its shard of every global batch. The meta step (DESIGN §1
"Multi-GPU") then matches one process over the global batch:

- the clean gradient v is taken on the unwrapped module, all-reduced and averaged (`average_tensors`);
- the JVP is local (per-sample quantities need no communication);
- the weights are normalised over the global batch (`all_reduce_scalar`: one sum, or a max and a sum);
- the real step runs through DistributedDataParallel with the loss times the world size, since
  DDP averages gradients while the weighted loss is a sum over the global batch; its forward carries
  the JVP's tangent, as in one process.

The trainer gathers each step's per-sample records (`all_gather_columns`), so every rank's records and
the run's per_sample.csv cover the whole training set, and checkpoints hold every rank's random
states (`gather_objects`), so a resumed data-parallel run continues as the uninterrupted one would.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._errors import L2BError

log = logging.getLogger(__name__)

__all__ = ["DistInfo", "setup", "teardown", "average_tensors", "all_reduce_scalar", "all_gather_columns",
           "gather_objects", "agree_on_step", "launch"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank in [0, world_size), its device, and whether it writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # launched by torchrun: a process group and DDP, even with one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun (or `l2b train --nproc`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun (nccl on CUDA, gloo on CPU); else a single process.

    Returns the DistInfo and the device this rank trains on (cuda:LOCAL_RANK on GPUs).
    """
    if not launched():
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)), True)
    if device.type == "cuda":
        if torch.cuda.device_count() <= info.local_rank:
            raise L2BError(f"rank {info.rank} wants cuda:{info.local_rank} but {torch.cuda.device_count()} "
                           "GPUs are visible; lower --nproc / --nproc_per_node")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    return info, device


def finish() -> None:
    """Wait until every rank has finished training: a rank that tears its process group down while another
    still talks to it can abort the other ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def average_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The mean over ranks of a dict of tensors, as one flattened all-reduce (one message, not one per tensor)."""
    if _world() == 1:
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
    if _world() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return out


def all_gather_columns(columns: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Each (n,) column concatenated over the ranks in rank order, in one message (same n on every rank).

    The per-sample records of a step (indices, labels, weights): afterwards every rank holds the
    global batch's, as one process would. Integers travel as float64, exact below 2**53.
    """
    world = _world()
    if world == 1:
        return columns
    stacked = torch.stack([c.detach().to(torch.float64) for c in columns])  # (columns, n)
    parts = [torch.empty_like(stacked) for _ in range(world)]
    dist.all_gather(parts, stacked)
    full = torch.cat(parts, dim=1)
    return tuple(full[i].to(c.dtype) for i, c in enumerate(columns))


def gather_objects(obj) -> list | None:
    """``obj`` of every rank, in rank order (a collective: all ranks call it); None in one process."""
    if _world() == 1:
        return None
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def agree_on_step(finite: bool, signum: int | None, device: torch.device) -> tuple[bool, int | None]:
    """(every rank's loss is finite, the signal any rank received): all ranks then take the same branch.

    A rank that skipped its backward or stopped alone would leave the others waiting in an all-reduce.
    """
    if _world() == 1:
        return finite, signum
    flags = torch.tensor([0 if finite else 1, signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0] == 0), int(flags[1]) or None


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (identity in a single process)."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def convert_sync_bn(model: nn.Module, info: DistInfo) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over the global batch in the real step)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if info.enabled else model


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m l2b <argv>`` in ``nproc`` processes with torch.distributed.run, on this machine.

    Any rank that fails ends all ranks (torchrun's agent stops the others); the failure becomes one
    L2BError naming the rank and exit code (the rank's own `l2b: error:` line is printed above it).
    SIGINT/SIGTERM reach every rank through the agent; the ranks agree on the step to stop after,
    write one checkpoint, and the launcher exits with 130/143 like a single process.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0", "--module", "l2b", *argv])
    try:
        run(args)
    except SignalException as exc:  # Ctrl-C / SIGTERM: the agent passed it on; rank 0 printed where to resume
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the root cause; the agent then stops the others
        raise L2BError(f"rank {rank} of {nproc} failed with exit code {failure.exitcode}; "
                       "all ranks were stopped (its message is above)") from None
    return 0


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without --nproc K / --nproc=K (the launched processes must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def is_rank_zero() -> bool:
    """True in a single process and in rank 0 of a launched one (who speaks for the run)."""
    return os.environ.get("RANK", "0") == "0"


def rank_prefix() -> str:
    """'[rank r] ' inside a launched process, '' otherwise (error lines say who failed)."""
    return f"[rank {os.environ['RANK']}] " if launched() and os.environ.get("WORLD_SIZE", "1") != "1" else ""

