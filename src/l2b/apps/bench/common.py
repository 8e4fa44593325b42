"""What the benchmarks share: the model, optimiser and steps of one set-up, random batches, the header line."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ...errors import L2BError
from ...fastnorm import native_tangents
from ...methods import StepContext, create_method
from ...models import create_model
from ...reference import reference_meta_weights

try:

    import higher

    has_higher = True
except ImportError:
    has_higher = False

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = ("higher",)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_env(model, batch_size, val_batch_size, image_shape, num_classes, device, amp, channels_last, seed):
    if amp not in AMP:
        raise L2BError(f"--amp must be one of {', '.join(AMP)}, got {amp!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise L2BError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    torch.manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = create_model(model, num_classes=num_classes, in_channels=image_shape[0]).to(dev, memory_format=layout)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    def autocast():
        return torch.autocast(dev.type, dtype=AMP[amp], enabled=AMP[amp] is not None)

    def finish(loss):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()

    def method_step(name: str, meta_grad: str = "exact", fuse: bool = True, generic: bool = False):
        method = create_method(name)

        def step(x, y, xv, yv):  # as the trainer does it (the L2B family: the real forward carries the tangent)
            ctx = StepContext(opt, lambda: (xv, yv), 1, num_classes, module=net, meta_grad=meta_grad,
                              fuse_forward=fuse)
            with autocast(), native_tangents() if generic else contextlib.nullcontext():
                loss = method.step(net, x, y, ctx).loss
            finish(loss)

        step.method = method
        return step

    def reference_step(x, y, xv, yv):
        with autocast():
            alpha, beta, pseudo = reference_meta_weights(net, x, y, xv, yv, optimizer=opt)[:3]
            logits = net(x)
            loss = (alpha * F.cross_entropy(logits, y, reduction="none")
                    + beta * F.cross_entropy(logits, pseudo, reduction="none")).sum()
        finish(loss)

    def peer_step(x, y, xv, yv):
        with autocast():
            alpha, beta, pseudo = higher_meta_weights(net, opt, x, y, xv, yv)
            logits = net(x)
            loss = (alpha * F.cross_entropy(logits, y, reduction="none")
                    + beta * F.cross_entropy(logits, pseudo, reduction="none")).sum()
        finish(loss)

    kinds = {"ce": method_step("ce"), "l2b_exact": method_step("l2b"), "l2b_fd": method_step("l2b", "fd"),
             "reference_double_backward": reference_step,
             # not in `l2b bench epoch`'s default list: the same exact step by other routes
             "l2b_exact_generic": method_step("l2b", generic=True), "l2b_unfused": method_step("l2b", fuse=False),
             "peer_higher": peer_step}
    env = SimpleNamespace(net=net, opt=opt, scaler=scaler, autocast=autocast, dev=dev)
    return dev, net, layout, kinds, method_step, env


def higher_meta_weights(net, opt, x, y, xv, yv):
    """The published recipe's weights (the official L2B main.py, with ``higher``): (alpha, beta, pseudo).

    A monkeypatched copy of the model takes one differentiable SGD step (the optimizer's own
    settings and momentum buffers) on sum_i eps_i f_i + eps'_i g_i at eps = eps' = 0, forwards the
    clean batch, and -d(clean loss)/d(eps, eps') clamped at 0 and divided by their joint sum are the
    weights. Its forwards run in the model's mode (train: batch statistics, and the running
    statistics move three times per step, as in the published code).
    """
    if not has_higher:
        raise L2BError("--peer higher needs the `higher` package: pip install higher")
    with higher.innerloop_ctx(net, opt) as (fnet, diffopt):
        logits = fnet(x)
        pseudo = logits.detach().argmax(1)
        eps = torch.zeros(len(y), dtype=logits.dtype, device=logits.device, requires_grad=True)
        eps_p = torch.zeros(len(y), dtype=logits.dtype, device=logits.device, requires_grad=True)
        diffopt.step((eps * F.cross_entropy(logits, y, reduction="none")).sum()
                     + (eps_p * F.cross_entropy(logits, pseudo, reduction="none")).sum())
        grad_eps, grad_eps_p = torch.autograd.grad(F.cross_entropy(fnet(xv), yv), (eps, eps_p))
    w, w_p = torch.clamp(-grad_eps, min=0), torch.clamp(-grad_eps_p, min=0)
    norm = w.sum() + w_p.sum()
    if norm != 0:
        w, w_p = w / norm, w_p / norm
    return w, w_p, pseudo


def random_batch(dev, layout, batch_size, val_batch_size, image_shape, num_classes):
    x = torch.randn(batch_size, *image_shape, device=dev).contiguous(memory_format=layout)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    xv = torch.randn(val_batch_size, *image_shape, device=dev).contiguous(memory_format=layout)
    yv = torch.randint(0, num_classes, (val_batch_size,), device=dev)
    return x, y, xv, yv


def header(result: dict, extra: str) -> str:
    return (f"device {result['device']} ({result['threads']} threads), model {result['model']}, "
            f"n={result['batch_size']}, m={result['val_batch_size']}, input {tuple(result['image_shape'])}, "
            f"amp {result['amp']}, channels-last {result['channels_last']}, {extra}")
