"""The update step shared by the trainer and by a method's preliminary stage, the schedule, evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..models import predict_logits

__all__ = ["cosine_lr", "optimizer_step", "fit_ce", "evaluate", "accuracy_and_loss"]


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """Cosine decay from base_lr at step 0 to 0 at total_steps (no restarts)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer, model: nn.Module, *, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, clipping (max norm ``grad_clip``; 0 disables) and the optimizer step.

    With an enabled ``scaler`` (fp16) the loss is scaled and the gradients unscaled before clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def fit_ce(model: nn.Module, images, labels: Tensor, *, cfg: Config, epochs: int) -> None:
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
        optimizer_step(loss, opt, model, grad_clip=cfg.grad_clip)


def evaluate(model: nn.Module, images, labels: Tensor, batch_size: int) -> float:
    """Accuracy in percent, in eval mode (running BatchNorm statistics); restores the mode after."""
    return accuracy_and_loss(model, images, labels, batch_size)[0]


def accuracy_and_loss(model: nn.Module, images, labels: Tensor, batch_size: int) -> tuple[float, float | None]:
    """Accuracy in percent and mean cross-entropy of ``labels`` (N,), in eval mode; restores the mode after.

    The loss is None for an empty set (its accuracy is reported as 0, as :func:`evaluate` always has).
    """
    if len(images) == 0:
        return 0.0, None
    logits = predict_logits(model, images, batch_size)  # (N, K), float32
    labels = labels.to(logits.device)
    correct = (logits.argmax(1) == labels).sum().item()
    return 100.0 * correct / len(images), F.cross_entropy(logits, labels).item()
