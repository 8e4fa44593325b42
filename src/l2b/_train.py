"""The one trainer. Reads top to bottom: data, model, optimizer, loop, evaluation, outputs.

Every method (`l2b._methods`) is a policy for the loss of a batch; this loop does the rest.
"""

from __future__ import annotations

import json
import logging
import math
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
from ._data import DeviceImages, ImageData, balanced_clean_split, balanced_order, channel_stats
from ._errors import L2BError
from ._methods import CrossEntropy, StepContext, create_method
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
    if trains_on_clean:  # ce+clean: the clean images join the training set with their true labels
        x_train = np.concatenate([x_train, x_clean])
        y_obs = np.concatenate([y_obs, y_clean])
        flipped = np.concatenate([flipped, np.zeros(len(y_clean), dtype=bool)])
    mean, std = channel_stats(x_train)

    def on_device(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)

    return TrainData(
        train=DeviceImages(x_train, device, mean, std),
        y_observed=on_device(y_obs),
        flipped=torch.as_tensor(flipped).to(device) if known else None,
        clean=DeviceImages(x_clean, device, mean, std),
        y_clean=on_device(y_clean),
        test=DeviceImages(data.x_test, device, mean, std),
        y_test=on_device(data.y_test),
        num_classes=k,
        in_channels=data.x_train.shape[1],
        noise_info=noise_info,
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


@torch.no_grad()
def evaluate(model: nn.Module, images: DeviceImages, labels: Tensor, batch_size: int) -> float:
    """Accuracy in percent, in eval mode (running BatchNorm statistics); restores the mode after."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(images)), device=labels.device)
        correct += (model(images.batch(idx)).argmax(1) == labels[idx]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(len(images), 1)


class SampleRecords:
    """Per training sample, accumulated over the steps after warm-up: alpha and beta sums, steps
    counted, pseudo-label disagreements, the last pseudo-label and its predicted probability."""

    def __init__(self, n: int, device: torch.device):
        z = lambda dtype: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self.alpha_sum, self.beta_sum = z(torch.float64), z(torch.float64)
        self.count, self.disagree = z(torch.int64), z(torch.int64)
        self.last_pseudo, self.last_prob = torch.full((n,), -1, dtype=torch.int64, device=device), z(torch.float32)

    def update(self, idx: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, pseudo: Tensor, logits: Tensor) -> None:
        batch = len(idx)  # weights are stored times the batch size: 1 = an average sample's share
        self.alpha_sum[idx] += alpha.double() * batch
        self.beta_sum[idx] += beta.double() * batch
        self.count[idx] += 1
        self.disagree[idx] += (pseudo != y).long()
        self.last_pseudo[idx] = pseudo
        self.last_prob[idx] = torch.softmax(logits.detach().float(), 1).gather(1, pseudo[:, None])[:, 0]

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


# ---------------------------------------------------------------- the loop

def train(cfg: Config, *, resume: str | Path | None = None, progress: bool = True) -> dict:
    """Train ``cfg.method`` and write the run folder; returns the summary dict.

    With ``resume``, continue the run in that folder from its last checkpoint (bit-exact on CPU).
    """
    if resume is not None:
        out = Path(resume)
        state = safe_load(out / "checkpoint.pt")
        cfg = make_config(state["config"], source=str(out / "checkpoint.pt"))
    method = create_method(cfg.method, normalize=cfg.normalize, temperature=cfg.temperature)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg)
    td = prepare_data(cfg, data, device, method.trains_on_clean)
    if resume is None:
        out = new_run_dir(cfg)
        save_yaml(cfg, out / "config.yaml")
        (out / "noise.json").write_text(json.dumps(td.noise_info, indent=1))
        np.save(out / "noisy_labels.npy", td.y_observed.cpu().numpy())
        for name, text in data.files.items():  # e.g. the seeded ISIC2019 split
            (out / name).write_text(text)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=td.num_classes, in_channels=td.in_channels,
                         pretrained=cfg.pretrained or None).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed + 1)  # epoch permutations and augmentation
    clean_source = CyclingBatches(len(td.y_clean), cfg.val_batch_size, torch.Generator().manual_seed(cfg.seed + 2))
    records = SampleRecords(len(td.y_observed), device)
    n_train = len(td.y_observed)
    batch_size = min(cfg.batch_size, n_train)
    # the last partial batch is dropped (BatchNorm needs > 1); or a fixed number of class-balanced batches
    steps_per_epoch = cfg.balanced_batches or n_train // batch_size
    total_steps = steps_per_epoch * cfg.epochs
    start_epoch, step, metrics, train_seconds = 0, 0, [], 0.0
    if resume is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order_gen.set_state(state["order_gen"])
        clean_source.load_state_dict(state["clean_source"])
        records.load_state_dict(state["records"])
        set_rng_state(state["rng"])
        start_epoch, step, metrics, train_seconds = state["epoch"], state["step"], state["metrics"], state["train_seconds"]

    def next_clean():
        idx = clean_source.next().to(device)
        return td.clean.batch(idx, augment=cfg.augment, generator=order_gen), td.y_clean[idx]

    ce = CrossEntropy()
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        policy = ce if (method.warmup_with_ce and epoch < cfg.warmup_epochs) else method
        perm = (balanced_order(td.y_observed.cpu(), steps_per_epoch, batch_size, order_gen) if cfg.balanced_batches
                else torch.randperm(n_train, generator=order_gen)).to(device)
        loss_sum, weight_stats = 0.0, torch.zeros(4, 2, dtype=torch.float64, device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress)
        for b in bar:
            lr = cosine_lr(step, total_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = td.train.batch(idx, augment=cfg.augment, generator=order_gen)
            y = td.y_observed[idx]
            ctx = StepContext(optimizer, next_clean, epoch, td.num_classes)
            result = policy.step(model, x, y, ctx)
            if not torch.isfinite(result.loss):
                raise L2BError(f"loss became {result.loss.item()} at epoch {epoch + 1}, step {step}; "
                               "lower --lr or set --grad-clip")
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            loss_sum += result.loss.item()
            if result.alpha is not None:
                records.update(idx, y, result.alpha, result.beta, result.pseudo, result.logits)
                if td.flipped is not None:
                    _accumulate_weight_stats(weight_stats, td.flipped[idx], result.alpha, result.beta)
        val_acc = evaluate(model, td.clean, td.y_clean, cfg.eval_batch_size)
        test_acc = evaluate(model, td.test, td.y_test, cfg.eval_batch_size)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        line = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(steps_per_epoch, 1),
                "val_acc": val_acc, "test_acc": test_acc, "seconds": seconds}
        if method.uses_meta_set and policy is method:
            line.update(_weight_means(weight_stats))
        metrics.append(line)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
        log.info("epoch %d/%d  loss %.4f  val %.2f  test %.2f  (%.1fs)", epoch + 1, cfg.epochs,
                 line["train_loss"], val_acc, test_acc, seconds)
        if progress:
            tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {line['train_loss']:.4f}  "
                       f"val {val_acc:6.2f}  test {test_acc:6.2f}  {seconds:5.1f}s")
        atomic_save({
            "config": cfg.to_dict(), "epoch": epoch + 1, "step": step, "metrics": metrics,
            "train_seconds": train_seconds, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "order_gen": order_gen.get_state(), "clean_source": clean_source.state_dict(),
            "records": records.state_dict(), "rng": rng_state(),
        }, out / "checkpoint.pt")

    summary = summarize(cfg, metrics, td.noise_info, train_seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["run_dir"] = str(out)
    return summary


def _accumulate_weight_stats(stats: Tensor, flipped: Tensor, alpha: Tensor, beta: Tensor) -> None:
    """stats rows: alpha sum, beta sum, count, unused; columns: clean, flipped."""
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
    best = max(metrics, key=lambda m: (m["val_acc"], -m["epoch"]))  # earliest epoch among ties
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
        "test_acc_max": max(m["test_acc"] for m in metrics),
        "train_seconds": round(train_seconds, 2),
    }
