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
from ._distributed import agree_on_step, all_gather_columns, convert_sync_bn, gather_objects, setup, wrap
from ._errors import Interrupted, L2BError
from ._methods import CrossEntropy, PrepareContext, StepContext, create_method
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
    state = None
    if resume is not None:
        out = Path(resume)
        state = safe_load(out / "checkpoint.pt")
        cfg = make_config(state["config"], source=str(out / "checkpoint.pt"))
    method = create_method(cfg.method, **cfg.to_dict())  # each method takes the keys it reads
    dist_info, device = setup(resolve_device(cfg.device))  # a single process unless launched by torchrun
    is_main, rank, world = dist_info.is_main, dist_info.rank, dist_info.world_size  # only rank 0 writes files
    if cfg.nproc != world:  # launched by torchrun: the run records (and checks batch sizes for) its world size
        cfg = make_config({**cfg.to_dict(), "nproc": world}, source=f"torchrun with {world} processes")
    if resume is None:
        # before any data is read: a bad --out fails fast; other ranks get a name they never write to
        out = new_run_dir(cfg) if is_main else Path(f"<rank {rank} writes no files>")
    data = load_dataset(cfg) if data is None else data
    td = prepare_data(cfg, data, device, method.trains_on_clean)
    pseudo_meta = method.uses_meta_set and cfg.meta_set == "pseudo"
    if method.uses_meta_set and not pseudo_meta and len(td.y_clean) == 0:
        raise L2BError(f"method {cfg.method!r} needs a clean set: set val_size > 0 or meta_set=pseudo")
    if resume is None and is_main:
        save_yaml(cfg, out / "config.yaml")
        (out / "noise.json").write_text(json.dumps(td.noise_info, indent=1))
        np.save(out / "noisy_labels.npy", td.y_observed.cpu().numpy())
        for name, text in data.files.items():  # e.g. the seeded ISIC2019 split
            (out / name).write_text(text)
        _save_data_record(out, td, data)

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
    clean_source = CyclingBatches(len(td.y_clean), cfg.val_batch_size, torch.Generator().manual_seed(cfg.seed + 2))
    records = SampleRecords(len(td.y_observed), device)
    n_train = len(td.y_observed)
    batch_size = min(cfg.batch_size, n_train)
    # the last partial batch is dropped (BatchNorm needs > 1); or a fixed number of class-balanced batches
    steps_per_epoch = cfg.balanced_batches or n_train // batch_size
    local_batch = batch_size // world  # each rank's shard of the global batch
    total_steps = steps_per_epoch * cfg.epochs
    # loop position and running totals: everything a checkpoint must hold besides the modules
    pos = {"epoch": 0, "step": 0, "train_seconds": 0.0, "metrics": [], "best_val": -1.0, **_epoch_totals(),
           "meta_idx": None}  # meta_set=pseudo: the training samples the meta batches come from
    if hasattr(method, "prepare"):  # a method's own stage (teacher, GLC stage 1) or meta network
        t0 = time.perf_counter()
        new_model = lambda: create_model(cfg.model, num_classes=td.num_classes, in_channels=td.in_channels).to(device)  # noqa: E731
        fit = lambda m, images, labels, epochs: fit_ce(m, images, labels, cfg=cfg, epochs=epochs)  # noqa: E731
        method.prepare(PrepareContext(cfg, td, device, new_model, fit, state.get("method") if state else None))
        log.info("%s: preparation took %.1fs", cfg.method, time.perf_counter() - t0)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order_gen.set_state(state["order_gen"])
        clean_source.load_state_dict(state["clean_source"])
        records.load_state_dict({k: v.to(device) for k, v in state["records"].items()})
        set_rng_state(state["rng"])
        pos = state["position"]
        if pos.get("meta_idx") is not None:  # the cycling source walks the pseudo meta set
            pos["meta_idx"] = pos["meta_idx"].to(device)
            clean_source = CyclingBatches(len(pos["meta_idx"]), cfg.val_batch_size, torch.Generator())
            clean_source.load_state_dict(state["clean_source"])
        if is_main:
            _write_metrics(out, pos["metrics"])  # drop lines of an epoch that had not reached its checkpoint

    def checkpoint(path: Path) -> None:
        # under DDP a collective (every rank's random states travel to rank 0); only rank 0 writes
        ranks = gather_objects({"rng": rng_state(), "aug_gen": aug_gen.get_state()})
        if not is_main:
            return
        atomic_save({
            "config": cfg.to_dict(), "position": pos, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "order_gen": order_gen.get_state(),
            "clean_source": clean_source.state_dict(), "records": records.state_dict(), "rng": rng_state(),
            "method": method.state_dict() if hasattr(method, "state_dict") else None, "ranks": ranks,
        }, path)

    # the real forward goes through torch.compile and DDP; the meta passes use the plain module
    train_model = wrap(torch.compile(model) if cfg.compile else model, dist_info, device)
    if world > 1 and state is None:
        torch.manual_seed(cfg.seed + rank)  # per-rank seed offset (dropout and the like)
    aug_gen = order_gen if world == 1 else torch.Generator().manual_seed(cfg.seed + 1 + 1000 * rank)
    if state is not None and (world > 1 or state.get("ranks")):
        saved = state.get("ranks") or [None]
        if len(saved) != world:
            raise L2BError(f"the checkpoint was written by {len(saved)} process(es), this run has {world}; "
                           f"resume it with --nproc {len(saved)}")
        set_rng_state(saved[rank]["rng"])  # each rank's own dropout and augmentation streams
        aug_gen.set_state(saved[rank]["aug_gen"])
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def next_clean():
        idx = clean_source.next().to(device)
        idx = idx[rank * (len(idx) // world) : (rank + 1) * (len(idx) // world)]  # this rank's shard
        if pos["meta_idx"] is not None:  # meta_set=pseudo: the batch comes from the training set
            idx = pos["meta_idx"][idx]
            x_val = td.train.batch(idx, augment=cfg.augment, generator=aug_gen)
            return x_val.contiguous(memory_format=layout), td.y_observed[idx]
        x_val = td.clean.batch(idx, augment=cfg.augment, generator=aug_gen)
        return x_val.contiguous(memory_format=layout), td.y_clean[idx]

    ce = CrossEntropy()
    model.train()
    with _StopSignals() as signals:
        while pos["epoch"] < cfg.epochs:
            epoch = pos["epoch"]
            t0 = time.perf_counter()
            policy = ce if (method.warmup_with_ce and epoch < cfg.warmup_epochs) else method
            if (pseudo_meta and pos["batch"] == 0 and epoch >= cfg.warmup_epochs
                    and (epoch - cfg.warmup_epochs) % cfg.meta_refresh == 0):
                pos["meta_idx"] = _pseudo_meta_set(cfg, model, td, epoch)
                clean_source = CyclingBatches(len(pos["meta_idx"]), cfg.val_batch_size,
                                              torch.Generator().manual_seed(cfg.seed + 2 + epoch))
            if pos["perm"] is None:
                pos["perm"] = (balanced_order(td.y_observed.cpu(), steps_per_epoch, batch_size, order_gen)
                               if cfg.balanced_batches else torch.randperm(n_train, generator=order_gen))
            perm = pos["perm"].to(device)
            bar = tqdm(range(pos["batch"], steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, disable=not progress)
            for b in bar:
                lr = cosine_lr(pos["step"], total_steps, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = perm[b * batch_size + rank * local_batch : b * batch_size + (rank + 1) * local_batch]
                x = td.train.batch(idx, augment=cfg.augment, generator=aug_gen).contiguous(memory_format=layout)
                y = td.y_observed[idx]
                ctx = StepContext(optimizer, next_clean, epoch, td.num_classes, module=model, world_size=world,
                                  meta_grad=cfg.meta_grad, fuse_forward=not (cfg.sync_bn or cfg.compile))
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    result = policy.step(train_model, x, y, ctx)
                finite, received = agree_on_step(bool(torch.isfinite(result.loss)), signals.received, device)
                if finite:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(result.loss).backward()
                    if cfg.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    pos["loss_sum"] += result.loss.item()
                    if result.alpha is not None:
                        prob = torch.softmax(result.logits.detach().float(), 1).gather(1, result.pseudo[:, None])[:, 0]
                        # under DDP every rank records the global batch, as one process would
                        g_idx, g_y, alpha, beta, pseudo, prob = all_gather_columns(
                            (idx, y, result.alpha, result.beta, result.pseudo, prob))
                        records.update(g_idx, g_y, alpha, beta, pseudo, prob)
                        if not (alpha.sum() + beta.sum()) > 0:  # no sample helps the clean loss
                            pos["zero_weight_batches"] += 1
                            log.info("epoch %d, step %d: all meta-weights are zero", epoch + 1, pos["step"])
                        if td.flipped is not None:
                            _accumulate_weight_stats(pos["weight_stats"], td.flipped[g_idx].cpu(), alpha.cpu(), beta.cpu())
                elif cfg.on_nan == "skip":
                    pos["skipped"] += 1
                    log.warning("non-finite loss at epoch %d, step %d: step skipped", epoch + 1, pos["step"])
                else:  # checkpoint.pt stays as it was: the state at the last checkpoint, before the fault
                    last = (f"the last good checkpoint is {out / 'checkpoint.pt'}" if (out / "checkpoint.pt").exists()
                            else "no checkpoint had been written yet")
                    raise L2BError(f"loss became {result.loss.item()} at epoch {epoch + 1}, step {pos['step']}; {last}. "
                                   "Lower --lr, set --grad-clip, or pass --on-nan skip")
                pos["step"] += 1
                pos["batch"] = b + 1
                if received is not None:
                    pos["epoch_seconds"] += time.perf_counter() - t0
                    checkpoint(out / "checkpoint.pt")
                    code = 130 if received == signal.SIGINT else 143
                    raise Interrupted(f"stopped by signal at epoch {epoch + 1}, step {pos['step']}; "
                                      f"resume with: l2b train --resume {out}", code)
            checkpoint_due = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
            if not is_main:  # ranks > 0 neither evaluate nor write; they join the checkpoint's gather
                pos.update(epoch=epoch + 1, **_epoch_totals())
                if checkpoint_due:
                    checkpoint(out / "checkpoint.pt")
                continue
            val_acc = evaluate(model, td.clean, td.y_clean, cfg.eval_batch_size) if len(td.y_clean) else None
            test_acc = evaluate(model, td.test, td.y_test, cfg.eval_batch_size) if len(td.y_test) else None
            seconds = pos["epoch_seconds"] + time.perf_counter() - t0
            line = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": pos["loss_sum"] / max(steps_per_epoch, 1),
                    "val_acc": val_acc, "test_acc": test_acc, "seconds": seconds}
            if pos["skipped"]:
                line["skipped_steps"] = pos["skipped"]
            if method.uses_meta_set and policy is method:
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
                             "model": model.state_dict()}, out / "best.pt")
            if checkpoint_due:
                checkpoint(out / "checkpoint.pt")
                _keep_history(out, epoch + 1, cfg.keep_checkpoints)

    if not is_main:
        return None
    probs = predict_probs(model, td.train, cfg.eval_batch_size).cpu().numpy()  # (N, K), final model
    np.save(out / "train_probs.npy", probs)
    write_table(per_sample_table(records.state_dict(), td.y_observed.cpu().numpy(), td.indices, probs,
                                 td.y_true, td.paths), out / "per_sample.csv")
    summary = summarize(cfg, pos["metrics"], td.noise_info, pos["train_seconds"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["run_dir"] = str(out)
    return summary


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
