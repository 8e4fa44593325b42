"""Set-up of a run: config (or the checkpoint's), process group, run folder, data, model, optimizer,
sources; and restoring a checkpoint into it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import Config, load_yaml, make_config
from ..data.arrays import ImageData
from ..data.prepare import TrainData, prepare_data
from ..data.sources import load_dataset
from ..errors import L2BError
from ..methods.base import Method, PrepareContext, create_method
from ..models import create_model
from ..parallel import gather_objects, is_rank_zero, launched
from .checkpoint import data_fingerprint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistInfo, convert_sync_bn, setup, wrap
from .outputs import (EpochLogs, check_out, clear_run_dir, environment, lock_run_dir, new_run_dir, record_environment,
                      resolve_logs, write_metrics, write_run_files)
from .state import CyclingBatches, LoopState, SampleRecords
from .update import fit_ce

log = logging.getLogger(__name__)

__all__ = ["Run", "start_run", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise L2BError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise L2BError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@dataclass
class Run:
    """A run between two steps: its set-up, and everything its checkpoint holds besides the config."""

    cfg: Config
    method: Method
    td: TrainData
    out: Path  # the run folder (only rank 0 writes)
    dist: DistInfo
    device: torch.device
    model: nn.Module  # the network: meta passes, evaluation, checkpoints
    train_model: nn.Module  # the same network as the real forward sees it (DDP, torch.compile)
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler  # fp16 only; a no-op otherwise
    order_gen: torch.Generator  # epoch permutations: the same on every rank
    aug_gen: torch.Generator  # augmentation: the order generator in one process, per rank under DDP
    clean_source: CyclingBatches  # the clean (or pseudo meta) set's batches
    records: SampleRecords
    state: LoopState
    steps_per_epoch: int
    batch_size: int  # global; each rank takes batch_size // world_size of it
    fingerprint: str = ""  # of the training data and its observed labels (l2b.train.checkpoint.data_fingerprint)
    lock: object = None  # the run folder's lock file (rank 0), held until the run ends
    y_true: Tensor | None = None  # (N,) true training labels on the device, where known
    logs: EpochLogs | None = None  # --log's writers (rank 0)

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def next_clean(self) -> tuple[Tensor, Tensor]:
        """This rank's shard of the next clean batch: (x_val (m, C, H, W), y_val (m,))."""
        idx = self.clean_source.next().to(self.device)
        shard = len(idx) // self.dist.world_size
        idx = idx[self.dist.rank * shard : (self.dist.rank + 1) * shard]
        images, labels = self.td.clean, self.td.y_clean
        if self.state.meta_idx is not None:  # meta_set=pseudo: the batch comes from the training set
            idx = self.state.meta_idx[idx]
            images, labels = self.td.train, self.td.y_observed
        x_val = images.batch(idx, augment=self.cfg.augment, generator=self.aug_gen)
        return x_val.contiguous(memory_format=self.layout), labels[idx]

    def checkpoint(self, path: Path) -> None:
        # under DDP a collective (every rank's random states travel to rank 0); only rank 0 writes
        ranks = gather_objects({"rng": rng_state(), "aug_gen": self.aug_gen.get_state()})
        if not self.dist.is_main:
            return
        save_checkpoint({
            "config": self.cfg.to_dict(), "position": self.state.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "order_gen": self.order_gen.get_state(),
            "clean_source": self.clean_source.state_dict(), "records": self.records.state_dict(),
            "rng": rng_state(), "ranks": ranks,
            "method": self.method.state_dict() if hasattr(self.method, "state_dict") else None,
        }, path, self.fingerprint)

    def release(self) -> None:
        """Close --log's writers and give up the run folder's lock (the run has ended)."""
        if self.logs is not None:
            self.logs.close()
            self.logs = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None


@dataclass
class _Claim:
    """What a start has made and locked, undone if the start fails: a failed start leaves nothing behind."""

    out: Path | None = None  # a run folder this start filled (fresh runs only)
    created: bool = False  # ... and created (else it was an empty folder the user gave)
    lock: object = None

    def undo(self) -> None:
        if self.out is not None:
            clear_run_dir(self.out, self.created)
        if self.lock is not None:
            self.lock.close()


def start_run(cfg: Config | None, resume: str | Path | None, data: ImageData | None, model: nn.Module | None,
              *, resume_anyway: bool = False) -> Run:
    """Set-up: config (or the checkpoint's), process group, data, run folder, model, optimizer, sources,
    and a first checkpoint before the first step.

    Everything is checked before the run folder is made; if the start fails all the same (a full disk,
    a signal), the folder it made is removed again. ``resume_anyway`` uses a checkpoint whose checksum
    or data fingerprint does not match (a warning instead of an error).
    """
    claim = _Claim()
    try:
        run = _set_up(cfg, resume, data, model, resume_anyway, claim)
    except BaseException:
        claim.undo()
        raise
    run.lock = claim.lock
    return run


def _resume_point(out: Path, resume_anyway: bool) -> tuple[dict | None, Config]:
    """The checkpoint of run folder ``out`` and its config; (None, saved config) for a run stopped before
    its first checkpoint, which then starts again from the beginning."""
    if not out.is_dir():
        raise L2BError(f"--resume {out}: no such run folder")
    if not (out / "checkpoint.pt").exists() and (out / "config.yaml").is_file():
        log.warning("%s has no checkpoint yet: starting it from the beginning with its config.yaml", out)
        return None, make_config(load_yaml(out / "config.yaml"), source=str(out / "config.yaml"))
    saved = load_checkpoint(out / "checkpoint.pt", fingerprint_check=not resume_anyway)
    return saved, make_config(saved["config"], source=str(out / "checkpoint.pt"))


def _fingerprint(td: TrainData) -> str:
    def images(im):  # the pixels in memory, or the file names when they stream from disk
        return im.x if hasattr(im, "x") else [str(p) for p in im.files.paths]

    return data_fingerprint([images(td.train), td.y_observed, images(td.clean), td.y_clean])


def _set_up(cfg, resume, data, model, resume_anyway: bool, claim: _Claim) -> Run:
    saved = None
    if resume is not None:
        out = Path(resume)
        if is_rank_zero() and out.is_dir():  # one writer per run folder
            claim.lock = lock_run_dir(out)
        saved, cfg = _resume_point(out, resume_anyway)
    method = create_method(cfg.method, **cfg.to_dict())  # each method takes the keys it reads
    device = resolve_device(cfg.device)
    if cfg.sync_bn and launched() and device.type != "cuda":  # DDP refuses SyncBatchNorm off the GPU
        raise L2BError(f"--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on {device.type}); "
                       "drop --sync-bn")
    dist_info, device = setup(device)  # a single process unless launched by torchrun
    world = dist_info.world_size
    if cfg.nproc != world:  # launched by torchrun: the run records (and checks batch sizes for) its world size
        cfg = make_config({**cfg.to_dict(), "nproc": world}, source=f"torchrun with {world} processes")
    logs = resolve_logs(cfg.log)  # a missing tensorboard package fails before anything is read or made
    if resume is None and dist_info.is_main:
        check_out(cfg)  # before any data is read: a bad --out fails fast
    data = load_dataset(cfg) if data is None else data
    td = prepare_data(cfg, data, device, method.trains_on_clean)
    if method.uses_meta_set and cfg.meta_set != "pseudo" and len(td.y_clean) == 0:
        raise L2BError(f"method {cfg.method!r} needs a trusted (clean) set and {cfg.dataset} brings none: give one "
                       "(--trusted KIND:PATH, or a val split in the data), or pass --meta-set pseudo, or choose a "
                       "method without one (e.g. --method ce)")
    fingerprint = _fingerprint(td)
    if saved is not None and saved.get("fingerprint", fingerprint) != fingerprint:
        msg = (f"{out / 'checkpoint.pt'} was trained on other data or other noisy labels than {cfg.dataset} "
               "gives now (the data fingerprint differs)")
        if not resume_anyway:
            raise L2BError(msg + "; restore the data, or pass --resume-anyway to continue on the new data knowingly")
        log.warning("%s; continuing (--resume-anyway)", msg)
    if resume is None:  # everything is checked: now the folder (other ranks get a name they never write to)
        if dist_info.is_main:
            out, claim.created = new_run_dir(cfg)
            claim.out, claim.lock = out, lock_run_dir(out)
        else:
            out = Path(f"<rank {dist_info.rank} writes no files>")
    env = environment(device, world)
    if saved is None and dist_info.is_main:
        write_run_files(out, cfg, td, data, env)
        write_metrics(out, [])

    torch.manual_seed(cfg.seed)
    if model is None:
        model = create_model(cfg.model, num_classes=td.num_classes, in_channels=td.in_channels,
                             pretrained=cfg.pretrained or None)
    model = model.to(device)
    if cfg.sync_bn:
        model = convert_sync_bn(model, dist_info)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed + 1)  # epoch permutations and augmentation
    n_train = len(td.y_observed)
    batch_size = min(cfg.batch_size, n_train)
    run = Run(
        cfg=cfg, method=method, td=td, out=out, dist=dist_info, device=device, model=model, train_model=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        order_gen=order_gen, aug_gen=order_gen,
        clean_source=CyclingBatches(len(td.y_clean), cfg.clean_batch_size, torch.Generator().manual_seed(cfg.seed + 2)),
        records=SampleRecords(n_train, device), state=LoopState(),
        # the last partial batch is dropped (BatchNorm needs > 1); or a fixed number of class-balanced batches
        steps_per_epoch=cfg.balanced_batches or n_train // batch_size, batch_size=batch_size, fingerprint=fingerprint,
        y_true=None if td.flipped is None else torch.as_tensor(td.y_true).long().to(device))
    if hasattr(method, "prepare"):  # a method's own stage (teacher, GLC stage 1) or meta network
        t0 = time.perf_counter()
        new_model = lambda: create_model(cfg.model, num_classes=td.num_classes, in_channels=td.in_channels).to(device)  # noqa: E731
        fit = lambda m, images, labels, epochs: fit_ce(m, images, labels, cfg=cfg, epochs=epochs)  # noqa: E731
        method.prepare(PrepareContext(cfg, td, device, new_model, fit, saved.get("method") if saved else None))
        log.info("%s: preparation took %.1fs", cfg.method, time.perf_counter() - t0)
    if saved is not None:
        try:
            restore(run, saved)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise L2BError(f"{out / 'checkpoint.pt'}: malformed checkpoint, it does not fit this run "
                           f"({type(exc).__name__}: {first[:200]})") from None
    # the real forward goes through torch.compile and DDP; the meta passes use the plain module
    run.train_model = wrap(torch.compile(model) if cfg.compile else model, dist_info, device)
    if world > 1:
        if saved is None:
            torch.manual_seed(cfg.seed + dist_info.rank)  # per-rank seed offset (dropout and the like)
        run.aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * dist_info.rank)
    if saved is not None and (world > 1 or saved.get("ranks")):
        ranks = saved.get("ranks") or [None]
        if len(ranks) != world:
            raise L2BError(f"the checkpoint was written by {len(ranks)} process(es), this run has {world}; "
                           f"resume it with --nproc {len(ranks)}")
        set_rng_state(ranks[dist_info.rank]["rng"])  # each rank's own dropout and augmentation streams
        run.aug_gen.set_state(ranks[dist_info.rank]["aug_gen"])
    if saved is None:  # so that a run killed at any moment, even in its first epoch, resumes
        run.checkpoint(out / "checkpoint.pt")
    if dist_info.is_main:
        record_environment(out, env, logs, resumed_at=None if saved is None else run.state.epoch)
        if logs:
            run.logs = EpochLogs(out, logs, metrics=run.state.metrics if saved is not None else None)
    return run


def restore(run: Run, saved: dict) -> None:
    """Load a checkpoint's modules, generators, records and loop position into a freshly set-up run."""
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.order_gen.set_state(saved["order_gen"])
    run.clean_source.load_state_dict(saved["clean_source"])
    run.records.load_state_dict({k: v.to(run.device) for k, v in saved["records"].items()})
    set_rng_state(saved["rng"])
    run.state = LoopState.from_dict(saved["position"])
    st = run.state
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (st.epoch, st.step, st.batch)) \
            or st.batch > run.steps_per_epoch or not isinstance(st.metrics, list) or len(st.metrics) != st.epoch:
        raise ValueError(f"position epoch={st.epoch!r}, step={st.step!r}, batch={st.batch!r} is not a point of this run")
    if run.state.meta_idx is not None:  # the cycling source walks the pseudo meta set
        run.state.meta_idx = run.state.meta_idx.to(run.device)
        run.clean_source = CyclingBatches(len(run.state.meta_idx), run.cfg.clean_batch_size, torch.Generator())
        run.clean_source.load_state_dict(saved["clean_source"])
    if run.dist.is_main:
        write_metrics(run.out, run.state.metrics)  # drop lines of an epoch that had not reached its checkpoint
