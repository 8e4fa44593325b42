"""The one trainer. Reads top to bottom: set-up, then per epoch the policy and order, the steps,
evaluation and outputs.

Every method (``l2b.methods``) is a policy for the loss of a batch; this loop does the rest.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..config import Config, parse_interval
from ..data.arrays import ImageData, balanced_order
from ..data.metaset import select_pseudo_meta
from ..data.prepare import TrainData
from ..errors import Interrupted, L2BError
from ..methods.base import Method, StepContext, fits_clean_set
from ..methods.reweight import CrossEntropy
from ..models import predict_probs
from ..parallel import agree_on_step, all_gather_columns
from ..runfiles import per_sample_table, write_table
from .checkpoint import atomic_save, safe_load, write_atomically
from .outputs import (accumulate_weight_hist, accumulate_weight_stats, accuracy_counts, keep_history, run_plan,
                      summarize, train_accuracies, weight_aurocs, weight_means)
from .setup import Run, start_run
from .state import CyclingBatches
from .update import accuracy_and_loss, cosine_lr, evaluate, optimizer_step

log = logging.getLogger(__name__)

__all__ = ["train"]


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
          data: ImageData | None = None, model: nn.Module | None = None, resume_anyway: bool = False) -> dict | None:
    """Train ``cfg.method`` and write the run folder; returns the summary dict (None on ranks > 0).

    With ``resume`` (a run folder), continue from its last checkpoint: on CPU the result is
    bit-identical to an uninterrupted run. SIGINT/SIGTERM finish the current step, write a
    checkpoint and raise :class:`Interrupted`. ``data`` replaces ``cfg.dataset`` with an in-memory
    data set (the estimator's arrays); ``model`` replaces ``create_model(cfg.model, ...)`` with a
    given, freshly initialised module (trained in place). ``resume_anyway`` resumes from a checkpoint whose
    checksum or data fingerprint does not match (with a warning).

    A checkpoint is written before the first step and then as ``cfg.checkpoint_every`` says (epochs,
    steps or minutes); only one process at a time may write a run folder.
    """
    with _StopSignals() as signals:  # a signal during set-up stops the run after its first step
        run = start_run(cfg, resume, data, model, resume_anyway=resume_anyway)
        try:
            return _train_loop(run, progress, signals, resume is not None)
        finally:
            run.release()


def _train_loop(run: Run, progress: bool, signals: _StopSignals, resumed: bool) -> dict | None:
    cfg, st = run.cfg, run.state
    progress = progress and run.dist.is_main  # one progress bar per run
    if progress:
        tqdm.write(run_plan(cfg, run.td, resumed_at=st.epoch if resumed else None))
    every, unit = parse_interval(cfg.checkpoint_every)
    last_save = time.monotonic()
    run.model.train()
    while st.epoch < cfg.epochs:
        t0 = time.perf_counter()
        policy, order = _begin_epoch(run)
        bar = tqdm(range(st.batch, run.steps_per_epoch), desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not progress)
        due = False
        for b in bar:
            received = _step(run, policy, order, b, signals.received)
            due = (unit == "steps" and st.step % every == 0) or (
                unit == "minutes" and _agree_due(run, time.monotonic() - last_save >= 60 * every))
            if received is not None or (due and st.batch < run.steps_per_epoch):
                now = time.perf_counter()  # a mid-epoch checkpoint: the epoch's time so far goes with it
                st.epoch_seconds += now - t0
                t0 = now
                run.checkpoint(run.out / "checkpoint.pt")
                last_save = time.monotonic()
            if received is not None:
                code = 130 if received == signal.SIGINT else 143
                raise Interrupted(f"stopped by signal at epoch {st.epoch + 1}, step {st.step}; "
                                  f"resume with: l2b train --resume {run.out}", code)
        if _end_epoch(run, policy, t0, progress, force_checkpoint=unit != "epochs" and due):
            last_save = time.monotonic()
    return _finish(run) if run.dist.is_main else None


def _agree_due(run: Run, due: bool) -> bool:
    """A time-based checkpoint is a collective under DDP: the ranks follow rank 0's clock."""
    if run.dist.world_size == 1:
        return due
    flag = torch.tensor([float(due)], device=run.device)
    torch.distributed.broadcast(flag, 0)
    return bool(flag.item())


def _begin_epoch(run: Run) -> tuple[Method, Tensor]:
    """The epoch's policy (cross-entropy during warm-up) and its sample order (global batch after batch)."""
    cfg, st, epoch = run.cfg, run.state, run.state.epoch
    policy = CrossEntropy() if (run.method.warmup_with_ce and epoch < cfg.warmup_epochs) else run.method
    if (run.method.uses_meta_set and cfg.meta_set == "pseudo" and st.batch == 0
            and epoch >= cfg.warmup_epochs and (epoch - cfg.warmup_epochs) % cfg.meta_refresh == 0):
        st.meta_idx = _pseudo_meta_set(cfg, run.model, run.td, epoch)
        run.clean_source = CyclingBatches(len(st.meta_idx), cfg.clean_batch_size,
                                          torch.Generator().manual_seed(cfg.seed + 2 + epoch))
    if st.perm is None:
        n_train = len(run.td.y_observed)
        st.perm = (balanced_order(run.td.y_observed.cpu(), run.steps_per_epoch, run.batch_size, run.order_gen)
                       if cfg.balanced_batches else torch.randperm(n_train, generator=run.order_gen))
    return policy, st.perm.to(run.device)


def _step(run: Run, policy: Method, order: Tensor, b: int, signum: int | None) -> int | None:
    """One optimizer step on global batch ``b`` of ``order``; returns the signal the ranks agreed to stop on."""
    cfg, td, st, optimizer = run.cfg, run.td, run.state, run.optimizer
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(st.step, run.steps_per_epoch * cfg.epochs, cfg.lr)
    rank, world = run.dist.rank, run.dist.world_size
    local = run.batch_size // world  # this rank's shard of the global batch
    idx = order[b * run.batch_size + rank * local : b * run.batch_size + (rank + 1) * local]
    x = td.train.batch(idx, augment=cfg.augment, generator=run.aug_gen).contiguous(memory_format=run.layout)
    y = td.y_observed[idx]
    # not fused through SyncBatchNorm or torch.compile: both run the forward as an autograd.Function that has
    # no forward-mode derivative ("You must implement the jvp function ...", `l2b bench ddp --compile`)
    ctx = StepContext(optimizer, run.next_clean, st.epoch, td.num_classes, module=run.model, world_size=world,
                      meta_grad=cfg.meta_grad, fuse_forward=not (cfg.sync_bn or cfg.compile))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    with torch.autocast(run.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        result = policy.step(run.train_model, x, y, ctx)
    finite, received = agree_on_step(bool(torch.isfinite(result.loss)), signum, run.device)
    if finite:
        optimizer_step(result.loss, optimizer, run.model, grad_clip=cfg.grad_clip, scaler=run.scaler)
        st.loss_sum += result.loss.item()
        if result.logits is not None:
            _record_accuracy(run, idx, y, result.logits)
        if result.alpha is not None:
            _record_weights(run, idx, y, result)
    elif cfg.on_nan == "skip":
        st.skipped += 1
        log.warning("non-finite loss at epoch %d, step %d: step skipped", st.epoch + 1, st.step)
    else:  # checkpoint.pt stays as it was: the state at the last checkpoint, before the fault
        last = (f"the last good checkpoint is {run.out / 'checkpoint.pt'}" if (run.out / "checkpoint.pt").exists()
                else "no checkpoint had been written yet")
        raise L2BError(f"loss became {result.loss.item()} at epoch {st.epoch + 1}, step {st.step}; {last}. "
                       "Lower --lr, set --grad-clip, or pass --on-nan skip")
    st.step += 1
    st.batch = b + 1
    return received


def _record_accuracy(run: Run, idx: Tensor, y: Tensor, logits: Tensor) -> None:
    """Count the real forward's predictions (train mode, this step's parameters) against the observed
    and, where known, the true labels; as training accuracy in Lightning or timm, no extra pass."""
    pred = logits.detach().argmax(1)
    if run.dist.world_size > 1:  # every rank counts the global batch, as one process would
        idx, pred = all_gather_columns((idx, pred))
        y = run.td.y_observed[idx]
    flipped = None if run.y_true is None else run.td.flipped[idx]
    y_true = None if run.y_true is None else run.y_true[idx]
    run.state.train_counts += accuracy_counts(pred, y, flipped, y_true).cpu()


def _record_weights(run: Run, idx: Tensor, y: Tensor, result) -> None:
    """Per-sample records and clean/flipped weight statistics of a meta step's (global) batch."""
    prob = torch.softmax(result.logits.detach().float(), 1).gather(1, result.pseudo[:, None])[:, 0]
    # under DDP every rank records the global batch, as one process would
    idx, y, alpha, beta, pseudo, prob = all_gather_columns((idx, y, result.alpha, result.beta, result.pseudo, prob))
    run.records.update(idx, y, alpha, beta, pseudo, prob)
    if not (alpha.sum() + beta.sum()) > 0:  # no sample helps the clean loss
        run.state.zero_weight_batches += 1
        log.info("epoch %d, step %d: all meta-weights are zero", run.state.epoch + 1, run.state.step)
    if run.td.flipped is not None:
        accumulate_weight_stats(run.state.weight_stats, run.td.flipped[idx].cpu(), alpha.cpu(), beta.cpu())
        run.state.add_epoch_weights(len(run.td.y_observed), idx, alpha, beta)
    accumulate_weight_hist(run.state.weight_hist, run.state.weight_moments, alpha, beta)


def _end_epoch(run: Run, policy: Method, t0: float, progress: bool, force_checkpoint: bool = False) -> bool:
    """Rank 0 evaluates, appends the metrics line, keeps best.pt; every rank joins a due checkpoint.

    Returns whether a checkpoint was written."""
    cfg, st, out, epoch = run.cfg, run.state, run.out, run.state.epoch
    every, unit = parse_interval(cfg.checkpoint_every)
    checkpoint_due = (force_checkpoint or (unit == "epochs" and (epoch + 1) % every == 0)
                      or epoch + 1 == cfg.epochs)
    if not run.dist.is_main:  # ranks > 0 neither evaluate nor write
        st.next_epoch()
        if checkpoint_due:
            run.checkpoint(out / "checkpoint.pt")
        return checkpoint_due
    td = run.td
    val_acc = val_loss = None
    if len(td.y_clean):
        val_acc, val_loss = accuracy_and_loss(run.model, td.clean, td.y_clean, cfg.eval_batch_size)
    test_due = epoch + 1 == cfg.epochs or (cfg.test_every and (epoch + 1) % cfg.test_every == 0)  # last: always
    test_acc = evaluate(run.model, td.test, td.y_test, cfg.eval_batch_size) if len(td.y_test) and test_due else None
    seconds = st.epoch_seconds + time.perf_counter() - t0  # training and evaluation, across a resume
    line = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": st.loss_sum / max(run.steps_per_epoch, 1),
            **train_accuracies(st.train_counts, truth_known=run.y_true is not None),
            "val_loss": val_loss, "val_acc": val_acc, "test_acc": test_acc, "seconds": seconds}
    if st.skipped:
        line["skipped_steps"] = st.skipped
    if run.method.uses_meta_set and policy is run.method:
        line["zero_weight_batches"] = st.zero_weight_batches
        line.update(weight_means(st.weight_stats))
        if td.flipped is not None:  # where the truth is known: do the weights single out the flipped samples?
            line.update(weight_aurocs(st.epoch_weights, td.flipped))
        if st.meta_idx is not None:
            line["meta_size"] = len(st.meta_idx)
    st.metrics.append(line)
    st.train_seconds += seconds
    if run.logs is not None:
        run.logs.epoch(st.metrics, st.weight_hist, st.weight_moments)
    st.next_epoch()
    try:
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
    except OSError as exc:
        raise L2BError(f"cannot write {out / 'metrics.jsonl'} ({exc.strerror}); the last good checkpoint is "
                       f"{out / 'checkpoint.pt'}: free space, then l2b train --resume {out}") from None
    if progress:
        tqdm.write(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {line['train_loss']:.4f}  "
                   f"train {_pct(line['train_acc'])}  val {_pct(val_acc)}  test {_pct(test_acc)}  {seconds:5.1f}s")
    if val_acc is not None and val_acc > st.best_val:
        st.best_val = val_acc
        atomic_save({"config": cfg.to_dict(), "epoch": epoch + 1, "val_acc": val_acc,
                     "model": run.model.state_dict()}, out / "best.pt")
    if checkpoint_due:
        run.checkpoint(out / "checkpoint.pt")
        keep_history(out, epoch + 1, cfg.keep_checkpoints)
    return checkpoint_due


def _finish(run: Run) -> dict:
    """Rank 0: the final model's probabilities of the training and trusted sets, per_sample.csv, summary.json."""
    cfg, td, out = run.cfg, run.td, run.out
    probs = predict_probs(run.model, td.train, cfg.eval_batch_size).cpu().numpy()  # (N, K), final model
    np.save(out / "train_probs.npy", probs)
    if len(td.y_clean):  # the final model on the trusted set: `l2b labels` estimates the noise with it
        np.save(out / "val_probs.npy", predict_probs(run.model, td.clean, cfg.eval_batch_size).cpu().numpy())
        np.save(out / "val_labels.npy", td.y_clean.cpu().numpy())
    write_table(per_sample_table(run.records.state_dict(), td.y_observed.cpu().numpy(), td.indices, probs,
                                 td.y_true, td.paths), out / "per_sample.csv")
    summary = summarize(cfg, run.state.metrics, td.noise_info, run.state.train_seconds, _best_val_test(run),
                        fits_clean_set(run.method))
    text = json.dumps(summary, indent=1).encode()  # written last and whole: a sweep counts the cell as done by it
    write_atomically(out / "summary.json", lambda fh: fh.write(text))
    summary["run_dir"] = str(out)
    return summary


def _best_val_test(run: Run) -> float | None:
    """Test accuracy of best.pt (the best clean-validation model) when its epoch had no test pass; else None."""
    metrics = [m for m in run.state.metrics if m["val_acc"] is not None]
    if not metrics or not len(run.td.y_test):
        return None
    best = max(metrics, key=lambda m: (m["val_acc"], -m["epoch"]))
    if best["test_acc"] is not None:
        return None
    model = copy.deepcopy(run.model)
    model.load_state_dict(safe_load(run.out / "best.pt", map_location=run.device)["model"])
    return evaluate(model, run.td.test, run.td.y_test, run.cfg.eval_batch_size)


def _pseudo_meta_set(cfg: Config, model: nn.Module, td: TrainData, epoch: int) -> Tensor:
    """meta_set=pseudo: confident training samples whose prediction agrees with their label (l2b.data.metaset)."""
    probs = predict_probs(model, td.train, cfg.eval_batch_size)
    idx = select_pseudo_meta(probs, td.y_observed, size=cfg.pseudo_size, confidence=cfg.meta_confidence)
    if len(idx) == 0:
        raise L2BError(f"no training sample is predicted with probability >= meta_confidence={cfg.meta_confidence} "
                       f"and agrees with its label at epoch {epoch + 1}; lower --meta-confidence or warm up longer")
    return idx


def _pct(acc: float | None) -> str:
    return "   n/a" if acc is None else f"{acc:6.2f}"
