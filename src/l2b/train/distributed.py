"""Data-parallel training: process group set-up, the DDP wrapper, launching K processes.

`torchrun --nproc_per_node K -m l2b train ...` (or `l2b train --nproc K`, which runs the same launcher)
starts K processes; each trains on its shard of every global batch. The meta step then matches one
process over the global batch (the collectives are in ``l2b.parallel``):

- the clean gradient v is taken on the unwrapped module, all-reduced and averaged;
- the JVP is local (per-sample quantities need no communication);
- the weights are normalised over the global batch (one scalar all-reduce: a sum, or a max and a sum);
- the real step runs through DistributedDataParallel with the loss times the world size, since
  DDP averages gradients while the weighted loss is a sum over the global batch; its forward carries
  the JVP's tangent, as in one process.

The trainer gathers each step's per-sample records, so every rank's records and the run's
per_sample.csv cover the whole training set, and checkpoints hold every rank's random states, so a
resumed data-parallel run continues as the uninterrupted one would.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import L2BError
from ..parallel import launched

log = logging.getLogger(__name__)

__all__ = ["DistInfo", "launched", "setup", "finish", "teardown", "wrap", "convert_sync_bn", "launch", "strip_nproc"]


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
