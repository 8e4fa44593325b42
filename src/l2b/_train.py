"""The one trainer. Reads top to bottom: data, model, optimizer, loop, evaluation, outputs.

Every method (`l2b._methods`) is a policy for the loss of a batch; this loop does the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import _datasets, _noise
from ._checkpoint import atomic_save, rng_state, safe_load, set_rng_state
from ._config import Config, make_config, save_yaml
from ._data import DeviceImages, ImageData, balanced_clean_split, balanced_order, channel_stats, concat_images, device_images
from ._distributed import DistInfo, agree_on_step, all_gather_columns, convert_sync_bn, gather_objects, setup, wrap
from ._errors import Interrupted, L2BError
from ._methods import CrossEntropy, Method, PrepareContext, StepContext, create_method
from ._labels import per_sample_table, write_table
from ._metaset import predict_probs, select_pseudo_meta
from ._models import create_model

log = logging.getLogger(__name__)

DATASETS = _datasets.DATASETS  # name -> loader(cfg); plus npz:PATH, folder:PATH, csv:PATH
NOISE_MODELS = _noise.NOISE_MODELS


# ---------------------------------------------------------------- data: split, noise, device

@dataclass
class TrainData:
    """Everything the loop reads, on the training device."""

    train: DeviceImages
    y_observed: Tensor  # (N,) labels the model is trained on
    flipped: Tensor | None  # (N,) bool, None when the truth is unknown
    clean: DeviceImages
    y_clean: Tensor  # (M,)
    test: DeviceImages
    y_test: Tensor
    num_classes: int
    in_channels: int
    noise_info: dict
    mean: Tensor  # (C,) channel mean and std the images are normalised with
    std: Tensor
    indices: np.ndarray  # (N,) each training sample's index in the data's training split (-1: none)
    y_true: np.ndarray | None  # (N,) true labels, None when unknown
    paths: list[str] | None  # (N,) source files, where the data has them


def load_dataset(cfg: Config) -> ImageData:
    return _datasets.load_dataset(cfg)


def prepare_data(cfg: Config, data: ImageData, device: torch.device, trains_on_clean: bool) -> TrainData:
    """Carve the clean set, pick the subset, apply noise (all from ``cfg.seed``), move to the device."""
    rng = np.random.default_rng(cfg.seed)
    k = data.num_classes
    if data.x_val is not None:
        x_clean, y_clean, pool = data.x_val, data.y_val, np.arange(len(data.y_train))
    else:
        clean_idx = balanced_clean_split(data.y_train, cfg.val_size, k, rng)
        x_clean, y_clean = data.x_train[clean_idx], data.y_train[clean_idx]
        pool = np.setdiff1d(np.arange(len(data.y_train)), clean_idx)
    if cfg.subset:
        if cfg.subset > len(pool):
            raise L2BError(f"subset={cfg.subset} exceeds the {len(pool)} training images left after the clean set")
        pool = np.sort(rng.choice(pool, size=cfg.subset, replace=False))
    y_true = data.y_train[pool]
    noisy = _noise.make_noise(cfg, data, pool, rng)
    known = data.train_labels_known
    noise_info = {
        "noise": cfg.noise if data.noisy_train is None else "given",
        "noise_rate": cfg.noise_rate,
        "noise_rate_actual": noisy.rate if known else None,
        "transition_matrix": noisy.transition.tolist() if known else None,
        "num_train": int(len(pool)),
        "num_clean": int(len(y_clean)),
    }
    x_train, y_obs, flipped = data.x_train[pool], noisy.labels, y_true != noisy.labels
    indices = pool
    paths = [data.paths[i] for i in pool] if data.paths is not None else None
    if trains_on_clean:  # ce+clean: the clean images join the training set with their true labels
        x_train = concat_images(x_train, x_clean)
        y_obs = np.concatenate([y_obs, y_clean])
        flipped = np.concatenate([flipped, np.zeros(len(y_clean), dtype=bool)])
        y_true = np.concatenate([y_true, y_clean])
        indices = np.concatenate([pool, clean_idx if data.x_val is None else np.full(len(y_clean), -1)])
        paths = None
    mean, std = channel_stats(x_train, seed=cfg.seed)

    def on_device(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)

    def images(x):  # image files (--stream) are decoded per batch by DataLoader workers
        return device_images(x, device, mean, std, workers=cfg.workers)

    return TrainData(
        train=images(x_train),
        y_observed=on_device(y_obs),
        flipped=torch.as_tensor(flipped).to(device) if known else None,
        clean=images(x_clean),
        y_clean=on_device(y_clean),
        test=images(data.x_test),
        y_test=on_device(data.y_test),
        num_classes=k,
        in_channels=data.x_train.shape[1],
        noise_info=noise_info,
        mean=mean,
        std=std,
        indices=np.asarray(indices, dtype=np.int64),
        y_true=y_true if known else None,
        paths=paths,
    )


class CyclingBatches:
    """Index batches from a persistent source: walks a permutation, reshuffles when it runs out.

    Used for the clean set, so a meta step never builds a new iterator. Its state is checkpointed.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.perm = torch.arange(n)
        self.pos = n  # exhausted: the first call reshuffles

    def next(self) -> Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------- schedule and evaluation

def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from base_lr at step 0 to 0 at total_steps (no restarts)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def evaluate(model: nn.Module, images: DeviceImages, labels: Tensor, batch_size: int) -> float:
    """Accuracy in percent, in eval mode (running BatchNorm statistics); restores the mode after."""
    if len(images) == 0:
        return 0.0
    predicted = predict_probs(model, images, batch_size).argmax(1).to(labels.device)
    return 100.0 * (predicted == labels).sum().item() / len(images)


class SampleRecords:
    """Per training sample, accumulated over the steps after warm-up: alpha and beta sums, steps
    counted, pseudo-label disagreements, the last pseudo-label and its predicted probability."""

    def __init__(self, n: int, device: torch.device):
        z = lambda dtype: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self.alpha_sum, self.beta_sum = z(torch.float64), z(torch.float64)
        self.count, self.disagree = z(torch.int64), z(torch.int64)
        self.last_pseudo, self.last_prob = torch.full((n,), -1, dtype=torch.int64, device=device), z(torch.float32)

    def update(self, idx: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, pseudo: Tensor, prob: Tensor) -> None:
        """A step's samples: indices, observed labels, weights, pseudo-labels and their probabilities, each (n,)."""
        batch = len(idx)  # weights are stored times the batch size: 1 = an average sample's share
        self.alpha_sum[idx] += alpha.double() * batch
        self.beta_sum[idx] += beta.double() * batch
        self.count[idx] += 1
        self.disagree[idx] += (pseudo != y).long()
        self.last_pseudo[idx] = pseudo
        self.last_prob[idx] = prob

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise L2BError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return torch.device(name)


def new_run_dir(cfg: Config) -> Path:
    """The run folder: ``cfg.out`` if given (it must not exist), else runs/<time>-<method>[-k]."""
    if cfg.out:
        out = Path(cfg.out)
        if out.exists():
            raise L2BError(f"output folder {out} already exists; choose another --out (nothing was overwritten)")
    else:
        stem = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.method.replace('+', '-')}"
        out, k = stem, 1
        while out.exists():
            k += 1
            out = stem.with_name(f"{stem.name}-{k}")
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise L2BError(f"cannot create output folder {out}: {exc.strerror}") from None
    return out


def fit_ce(model: nn.Module, images: DeviceImages, labels: Tensor, *, cfg: Config, epochs: int) -> None:
    """Plain cross-entropy training of an auxiliary model (a method's preliminary stage, e.g. a teacher):
    the run's SGD settings, batch size, clipping and augmentation, cosine decay over ``epochs``."""
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(labels)
    batch_size = min(cfg.batch_size, n)
    per_epoch = n // batch_size
    model.train()
    for step in range(epochs * per_epoch):
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=gen).to(labels.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, epochs * per_epoch, cfg.lr)
        idx = perm[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        loss = F.cross_entropy(model(images.batch(idx, augment=cfg.augment, generator=gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()


# ---------------------------------------------------------------- the loop

class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop reads after each step (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config | None, *, resume: str | Path | None = None, progress: bool = True,
          data: ImageData | None = None, model: nn.Module | None = None) -> dict | None:
    """Train ``cfg.method`` and write the run folder; returns the summary dict (None on ranks > 0).

    With ``resume`` (a run folder), continue from its last checkpoint: on CPU the result is
    bit-identical to an uninterrupted run. SIGINT/SIGTERM finish the current step, write a
    checkpoint and raise :class:`Interrupted`. ``data`` replaces ``cfg.dataset`` with an in-memory
    data set (the estimator's arrays); ``model`` replaces ``create_model(cfg.model, ...)`` with a
    given, freshly initialised module (trained in place).
    """
    run = _start(cfg, resume, data, model)
    cfg, pos = run.cfg, run.pos
    progress = progress and run.dist.is_main  # one progress bar per run
    run.model.train()
    with _StopSignals() as signals:
        while pos["epoch"] < cfg.epochs:
            t0 = time.perf_counter()
            policy, order = _begin_epoch(run)
            bar = tqdm(range(pos["batch"], run.steps_per_epoch), desc=f"epoch {pos['epoch'] + 1}/{cfg.epochs}",
                       leave=False, disable=not progress)
            for b in bar:
                received = _step(run, policy, order, b, signals.received)
                if received is not None:
                    pos["epoch_seconds"] += time.perf_counter() - t0
                    run.checkpoint(run.out / "checkpoint.pt")
                    code = 130 if received == signal.SIGINT else 143
                    raise Interrupted(f"stopped by signal at epoch {pos['epoch'] + 1}, step {pos['step']}; "
                                      f"resume with: l2b train --resume {run.out}", code)
            _end_epoch(run, policy, t0, progress)
    return _finish(run) if run.dist.is_main else None


@dataclass
class _Run:
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
    pos: dict  # loop position and running totals (see _epoch_totals)
    steps_per_epoch: int
    batch_size: int  # global; each rank takes batch_size // world_size of it

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def next_clean(self) -> tuple[Tensor, Tensor]:
        """This rank's shard of the next clean batch: (x_val (m, C, H, W), y_val (m,))."""
        idx = self.clean_source.next().to(self.device)
        shard = len(idx) // self.dist.world_size
        idx = idx[self.dist.rank * shard : (self.dist.rank + 1) * shard]
        images, labels = self.td.clean, self.td.y_clean
        if self.pos["meta_idx"] is not None:  # meta_set=pseudo: the batch comes from the training set
            idx = self.pos["meta_idx"][idx]
            images, labels = self.td.train, self.td.y_observed
        x_val = images.batch(idx, augment=self.cfg.augment, generator=self.aug_gen)
        return x_val.contiguous(memory_format=self.layout), labels[idx]

    def checkpoint(self, path: Path) -> None:
        # under DDP a collective (every rank's random states travel to rank 0); only rank 0 writes
        ranks = gather_objects({"rng": rng_state(), "aug_gen": self.aug_gen.get_state()})
        if not self.dist.is_main:
            return
        atomic_save({
            "config": self.cfg.to_dict(), "position": self.pos, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "order_gen": self.order_gen.get_state(),
            "clean_source": self.clean_source.state_dict(), "records": self.records.state_dict(),
            "rng": rng_state(), "ranks": ranks,
            "method": self.method.state_dict() if hasattr(self.method, "state_dict") else None,
        }, path)


def _start(cfg: Config | None, resume, data: ImageData | None, model: nn.Module | None) -> _Run:
    """Set-up: config (or the checkpoint's), process group, run folder, data, model, optimizer, sources."""
    state = None
    if resume is not None:
        out = Path(resume)
        state = safe_load(out / "checkpoint.pt")
        cfg = make_config(state["config"], source=str(out / "checkpoint.pt"))
    method = create_method(cfg.method, **cfg.to_dict())  # each method takes the keys it reads
    dist_info, device = setup(resolve_device(cfg.device))  # a single process unless launched by torchrun
    world = dist_info.world_size
    if cfg.nproc != world:  # launched by torchrun: the run records (and checks batch sizes for) its world size
        cfg = make_config({**cfg.to_dict(), "nproc": world}, source=f"torchrun with {world} processes")
    if resume is None:
        # before any data is read: a bad --out fails fast; other ranks get a name they never write to
        out = new_run_dir(cfg) if dist_info.is_main else Path(f"<rank {dist_info.rank} writes no files>")
    data = load_dataset(cfg) if data is None else data
    td = prepare_data(cfg, data, device, method.trains_on_clean)
    if method.uses_meta_set and cfg.meta_set != "pseudo" and len(td.y_clean) == 0:
        raise L2BError(f"method {cfg.method!r} needs a clean set: set val_size > 0 or meta_set=pseudo")
    if resume is None and dist_info.is_main:
        _write_run_files(out, cfg, td, data)

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
    run = _Run(
        cfg, method, td, out, dist_info, device, model, model, optimizer,
        torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"), order_gen, order_gen,
        CyclingBatches(len(td.y_clean), cfg.val_batch_size, torch.Generator().manual_seed(cfg.seed + 2)),
        SampleRecords(n_train, device),
        # everything a checkpoint must hold besides the modules; meta_idx: meta_set=pseudo's samples
        {"epoch": 0, "step": 0, "train_seconds": 0.0, "metrics": [], "best_val": -1.0, **_epoch_totals(),
         "meta_idx": None},
        # the last partial batch is dropped (BatchNorm needs > 1); or a fixed number of class-balanced batches
        cfg.balanced_batches or n_train // batch_size, batch_size)
    if hasattr(method, "prepare"):  # a method's own stage (teacher, GLC stage 1) or meta network
        t0 = time.perf_counter()
        new_model = lambda: create_model(cfg.model, num_classes=td.num_classes, in_channels=td.in_channels).to(device)  # noqa: E731
        fit = lambda m, images, labels, epochs: fit_ce(m, images, labels, cfg=cfg, epochs=epochs)  # noqa: E731
        method.prepare(PrepareContext(cfg, td, device, new_model, fit, state.get("method") if state else None))
        log.info("%s: preparation took %.1fs", cfg.method, time.perf_counter() - t0)
    if state is not None:
        _restore(run, state)
    # the real forward goes through torch.compile and DDP; the meta passes use the plain module
    run.train_model = wrap(torch.compile(model) if cfg.compile else model, dist_info, device)
    if world > 1:
        if state is None:
            torch.manual_seed(cfg.seed + dist_info.rank)  # per-rank seed offset (dropout and the like)
        run.aug_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * dist_info.rank)
    if state is not None and (world > 1 or state.get("ranks")):
        saved = state.get("ranks") or [None]
        if len(saved) != world:
            raise L2BError(f"the checkpoint was written by {len(saved)} process(es), this run has {world}; "
                           f"resume it with --nproc {len(saved)}")
        set_rng_state(saved[dist_info.rank]["rng"])  # each rank's own dropout and augmentation streams
        run.aug_gen.set_state(saved[dist_info.rank]["aug_gen"])
    return run


def _restore(run: _Run, state: dict) -> None:
    """Load a checkpoint's modules, generators, records and loop position into a freshly set-up run."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.order_gen.set_state(state["order_gen"])
    run.clean_source.load_state_dict(state["clean_source"])
    run.records.load_state_dict({k: v.to(run.device) for k, v in state["records"].items()})
    set_rng_state(state["rng"])
    run.pos = state["position"]
    if run.pos.get("meta_idx") is not None:  # the cycling source walks the pseudo meta set
        run.pos["meta_idx"] = run.pos["meta_idx"].to(run.device)
        run.clean_source = CyclingBatches(len(run.pos["meta_idx"]), run.cfg.val_batch_size, torch.Generator())
        run.clean_source.load_state_dict(state["clean_source"])
    if run.dist.is_main:
        _write_metrics(run.out, run.pos["metrics"])  # drop lines of an epoch that had not reached its checkpoint


def _begin_epoch(run: _Run) -> tuple[Method, Tensor]:
    """The epoch's policy (cross-entropy during warm-up) and its sample order (global batch after batch)."""
    cfg, pos, epoch = run.cfg, run.pos, run.pos["epoch"]
    policy = CrossEntropy() if (run.method.warmup_with_ce and epoch < cfg.warmup_epochs) else run.method
    if (run.method.uses_meta_set and cfg.meta_set == "pseudo" and pos["batch"] == 0
            and epoch >= cfg.warmup_epochs and (epoch - cfg.warmup_epochs) % cfg.meta_refresh == 0):
        pos["meta_idx"] = _pseudo_meta_set(cfg, run.model, run.td, epoch)
        run.clean_source = CyclingBatches(len(pos["meta_idx"]), cfg.val_batch_size,
                                          torch.Generator().manual_seed(cfg.seed + 2 + epoch))
    if pos["perm"] is None:
        n_train = len(run.td.y_observed)
        pos["perm"] = (balanced_order(run.td.y_observed.cpu(), run.steps_per_epoch, run.batch_size, run.order_gen)
                       if cfg.balanced_batches else torch.randperm(n_train, generator=run.order_gen))
    return policy, pos["perm"].to(run.device)


def _step(run: _Run, policy: Method, order: Tensor, b: int, signum: int | None) -> int | None:
    """One optimizer step on global batch ``b`` of ``order``; returns the signal the ranks agreed to stop on."""
    cfg, td, pos, optimizer = run.cfg, run.td, run.pos, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(pos["step"], run.steps_per_epoch * cfg.epochs, cfg.lr)
    rank, world = run.dist.rank, run.dist.world_size
    local = run.batch_size // world  # this rank's shard of the global batch
    idx = order[b * run.batch_size + rank * local : b * run.batch_size + (rank + 1) * local]
    x = td.train.batch(idx, augment=cfg.augment, generator=run.aug_gen).contiguous(memory_format=run.layout)
    y = td.y_observed[idx]
    ctx = StepContext(optimizer, run.next_clean, pos["epoch"], td.num_classes, module=run.model, world_size=world,
                      meta_grad=cfg.meta_grad, fuse_forward=not (cfg.sync_bn or cfg.compile))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    with torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        result = policy.step(run.train_model, x, y, ctx)
    finite, received = agree_on_step(bool(torch.isfinite(result.loss)), signum, run.device)
    if finite:
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(result.loss).backward()
        if cfg.grad_clip > 0:
            run.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        pos["loss_sum"] += result.loss.item()
        if result.alpha is not None:
            _record_weights(run, idx, y, result)
    elif cfg.on_nan == "skip":
        pos["skipped"] += 1
        log.warning("non-finite loss at epoch %d, step %d: step skipped", pos["epoch"] + 1, pos["step"])
    else:  # checkpoint.pt stays as it was: the state at the last checkpoint, before the fault
        last = (f"the last good checkpoint is {run.out / 'checkpoint.pt'}" if (run.out / "checkpoint.pt").exists()
                else "no checkpoint had been written yet")
        raise L2BError(f"loss became {result.loss.item()} at epoch {pos['epoch'] + 1}, step {pos['step']}; {last}. "
                       "Lower --lr, set --grad-clip, or pass --on-nan skip")
    pos["step"] += 1
    pos["batch"] = b + 1
    return received


def _record_weights(run: _Run, idx: Tensor, y: Tensor, result) -> None:
    """Per-sample records and clean/flipped weight statistics of a meta step's (global) batch."""
    prob = torch.softmax(result.logits.detach().float(), 1).gather(1, result.pseudo[:, None])[:, 0]
    # under DDP every rank records the global batch, as one process would
    idx, y, alpha, beta, pseudo, prob = all_gather_columns((idx, y, result.alpha, result.beta, result.pseudo, prob))
    run.records.update(idx, y, alpha, beta, pseudo, prob)
    if not (alpha.sum() + beta.sum()) > 0:  # no sample helps the clean loss
        run.pos["zero_weight_batches"] += 1
        log.info("epoch %d, step %d: all meta-weights are zero", run.pos["epoch"] + 1, run.pos["step"])
    if run.td.flipped is not None:
        _accumulate_weight_stats(run.pos["weight_stats"], run.td.flipped[idx].cpu(), alpha.cpu(), beta.cpu())


def _end_epoch(run: _Run, policy: Method, t0: float, progress: bool) -> None:
    """Rank 0 evaluates, appends the metrics line, keeps best.pt; every rank joins a due checkpoint."""
    cfg, pos, out, epoch = run.cfg, run.pos, run.out, run.pos["epoch"]
    checkpoint_due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
    if not run.dist.is_main:  # ranks > 0 neither evaluate nor write
        pos.update(epoch=epoch + 1, **_epoch_totals())
        if checkpoint_due:
            run.checkpoint(out / "checkpoint.pt")
        return
    td = run.td
    val_acc = evaluate(run.model, td.clean, td.y_clean, cfg.eval_batch_size) if len(td.y_clean) else None
    test_acc = evaluate(run.model, td.test, td.y_test, cfg.eval_batch_size) if len(td.y_test) else None
    seconds = pos["epoch_seconds"] + time.perf_counter() - t0  # training and evaluation, across a resume
    line = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": pos["loss_sum"] / max(run.steps_per_epoch, 1),
            "val_acc": val_acc, "test_acc": test_acc, "seconds": seconds}
    if pos["skipped"]:
        line["skipped_steps"] = pos["skipped"]
    if run.method.uses_meta_set and policy is run.method:
        line["zero_weight_batches"] = pos["zero_weight_batches"]
        line.update(_weight_means(pos["weight_stats"]))
        if pos["meta_idx"] is not None:
            line["meta_size"] = len(pos["meta_idx"])
    pos["metrics"].append(line)
    pos["train_seconds"] += seconds
    pos.update(epoch=epoch + 1, **_epoch_totals())
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
    if progress:
        tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {line['train_loss']:.4f}  "
                   f"val {_pct(val_acc)}  test {_pct(test_acc)}  {seconds:5.1f}s")
    if val_acc is not None and val_acc > pos["best_val"]:
        pos["best_val"] = val_acc
        atomic_save({"config": cfg.to_dict(), "epoch": epoch + 1, "val_acc": val_acc,
                     "model": run.model.state_dict()}, out / "best.pt")
    if checkpoint_due:
        run.checkpoint(out / "checkpoint.pt")
        _keep_history(out, epoch + 1, cfg.keep_checkpoints)


def _finish(run: _Run) -> dict:
    """Rank 0: the final model's training-set probabilities, per_sample.csv and summary.json."""
    cfg, td, out = run.cfg, run.td, run.out
    probs = predict_probs(run.model, td.train, cfg.eval_batch_size).cpu().numpy()  # (N, K), final model
    np.save(out / "train_probs.npy", probs)
    write_table(per_sample_table(run.records.state_dict(), td.y_observed.cpu().numpy(), td.indices, probs,
                                 td.y_true, td.paths), out / "per_sample.csv")
    summary = summarize(cfg, run.pos["metrics"], td.noise_info, run.pos["train_seconds"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["run_dir"] = str(out)
    return summary


def _write_run_files(out: Path, cfg: Config, td: TrainData, data: ImageData) -> None:
    """What a fresh run folder holds before the first step: config, noise, labels, the data record."""
    save_yaml(cfg, out / "config.yaml")
    (out / "noise.json").write_text(json.dumps(td.noise_info, indent=1))
    np.save(out / "noisy_labels.npy", td.y_observed.cpu().numpy())
    for name, text in data.files.items():  # e.g. the seeded ISIC2019 split
        (out / name).write_text(text)
    _save_data_record(out, td, data)


def _epoch_totals() -> dict:
    """The loop position within an epoch and its running totals, as at an epoch's start."""
    return {"batch": 0, "perm": None, "loss_sum": 0.0, "skipped": 0, "zero_weight_batches": 0,
            "epoch_seconds": 0.0, "weight_stats": torch.zeros(3, 2, dtype=torch.float64)}


def _pseudo_meta_set(cfg: Config, model: nn.Module, td: TrainData, epoch: int) -> Tensor:
    """meta_set=pseudo: confident training samples whose prediction agrees with their label (l2b._metaset)."""
    probs = predict_probs(model, td.train, cfg.eval_batch_size)
    idx = select_pseudo_meta(probs, td.y_observed, size=cfg.pseudo_size, confidence=cfg.meta_confidence)
    if len(idx) == 0:
        raise L2BError(f"no training sample is predicted with probability >= meta_confidence={cfg.meta_confidence} "
                       f"and agrees with its label at epoch {epoch + 1}; lower --meta-confidence or warm up longer")
    return idx


def _save_data_record(out: Path, td: TrainData, data: ImageData) -> None:
    """What `l2b labels`, `l2b predict` and `l2b eval` need besides the checkpoint."""
    np.save(out / "train_indices.npy", td.indices)
    if td.y_true is not None:
        np.save(out / "true_labels.npy", td.y_true)
    (out / "classes.json").write_text(json.dumps(list(data.classes)))
    (out / "normalization.json").write_text(json.dumps({
        "mean": td.mean.tolist(), "std": td.std.tolist(), "input_shape": list(data.x_train.shape[1:]),
        "input_dtype": str(data.x_train.dtype), "scale": 255.0 if data.x_train.dtype == np.uint8 else 1.0,
    }, indent=1))


def _pct(acc: float | None) -> str:
    return "   n/a" if acc is None else f"{acc:6.2f}"


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    os.replace(tmp, out / "metrics.jsonl")


def _keep_history(out: Path, epoch: int, keep: int) -> None:
    """Besides checkpoint.pt (the latest), keep copies of the last ``keep - 1`` epoch checkpoints."""
    if keep <= 1:
        return
    shutil.copyfile(out / "checkpoint.pt", out / f"checkpoint-epoch{epoch:04d}.pt")
    history = sorted(out.glob("checkpoint-epoch*.pt"))
    for old in history[: max(len(history) - (keep - 1), 0)]:
        old.unlink()


def _accumulate_weight_stats(stats: Tensor, flipped: Tensor, alpha: Tensor, beta: Tensor) -> None:
    """stats (3, 2), rows: alpha sum, beta sum, count; columns: clean, flipped samples."""
    n = len(alpha)
    for col, mask in enumerate((~flipped, flipped)):
        stats[0, col] += alpha[mask].double().sum() * n
        stats[1, col] += beta[mask].double().sum() * n
        stats[2, col] += mask.sum()


def _weight_means(stats: Tensor) -> dict:
    s = stats.cpu().tolist()
    mean = lambda row, col: (s[row][col] / s[2][col]) if s[2][col] else None  # noqa: E731
    return {"alpha_clean": mean(0, 0), "alpha_flipped": mean(0, 1), "beta_clean": mean(1, 0), "beta_flipped": mean(1, 1)}


def summarize(cfg: Config, metrics: list[dict], noise_info: dict, train_seconds: float) -> dict:
    """The three accuracies of DESIGN §5: last epoch, at the best clean-validation epoch, max over epochs."""
    scored = [m for m in metrics if m["val_acc"] is not None]  # empty without a clean set
    best = max(scored, key=lambda m: (m["val_acc"], -m["epoch"])) if scored else {"test_acc": None, "epoch": None}
    tests = [m["test_acc"] for m in metrics if m["test_acc"] is not None]
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "noise": noise_info["noise"],
        "noise_rate": cfg.noise_rate,
        "noise_rate_actual": noise_info["noise_rate_actual"],
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "test_acc_last": metrics[-1]["test_acc"],
        "test_acc_best_val": best["test_acc"],
        "best_val_epoch": best["epoch"],
        "test_acc_max": max(tests) if tests else None,
        "train_seconds": round(train_seconds, 2),
    }
