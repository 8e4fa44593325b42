"""`l2b bench epoch` (images per second of a whole epoch per method) and `l2b bench weights` (agreement
of bf16/fp16 and finite-difference meta-weights with exact float32 ones)."""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ...data.arrays import DeviceImages
from ...errors import L2BError
from ...meta import meta_weights
from ...methods import PrepareContext, list_methods
from ...models import create_model
from .common import AMP, header, step_env, sync


def bench_epoch(*, model: str = "small-cnn", num_images: int = 10000, batch_size: int = 128,
                val_batch_size: int = 100, image_shape=(3, 32, 32), num_classes: int = 10,
                num_clean: int = 1000, device: str = "cpu", amp: str = "off", channels_last: bool = False,
                methods=("ce", "l2b_exact", "l2b_fd"), augment: bool = True, seed: int = 0,
                repeats: int = 1) -> dict:
    """Seconds and images/second of one whole epoch (num_images // batch_size steps) per method.

    Data are random uint8 images on the device, batches made as the trainer makes them (index
    gather, float conversion, normalisation, random crop + flip when ``augment``); a short warm-up
    of 2 steps per method (cuDNN autotuning, allocator) is not timed. "data" is the batch making alone.
    ``methods`` may name the built-in kinds (ce, l2b_exact, l2b_fd, reference_double_backward) or any
    registered method; a method's preliminary stage (GLC's stage 1, a distillation teacher) is not
    run: its ``prepare`` gets a no-op fit, since only the per-epoch cost is measured. With ``repeats``
    > 1 the methods' epochs run round-robin that many times and each reports its median, so a drift
    in machine speed hits all methods alike.
    """
    if repeats < 1:
        raise L2BError(f"--repeats must be >= 1, got {repeats}")
    dev, net, layout, kinds, method_step, _ = step_env(model, batch_size, val_batch_size, image_shape, num_classes,
                                                     device, amp, channels_last, seed)
    unknown = set(methods) - set(kinds) - set(list_methods())
    if unknown:
        raise L2BError(f"unknown bench method(s) {sorted(unknown)}; choose from {', '.join(kinds)} "
                       f"or a method: {', '.join(list_methods())}")
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.full((image_shape[0],), 0.5), torch.full((image_shape[0],), 0.25)
    train = DeviceImages(torch.randint(0, 256, (num_images, *image_shape), dtype=torch.uint8, generator=g).numpy(),
                         dev, mean, std)
    clean = DeviceImages(torch.randint(0, 256, (num_clean, *image_shape), dtype=torch.uint8, generator=g).numpy(),
                         dev, mean, std)
    y_train = torch.randint(0, num_classes, (num_images,), generator=g).to(dev)
    y_clean = torch.randint(0, num_classes, (num_clean,), generator=g).to(dev)
    steps = num_images // batch_size
    aug_gen = torch.Generator(device=dev).manual_seed(seed)

    def batches():
        perm = torch.randperm(num_images, device=dev, generator=aug_gen)
        for b in range(steps):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            cidx = torch.randint(0, num_clean, (val_batch_size,), device=dev, generator=aug_gen)
            x = train.batch(idx, augment=augment, generator=aug_gen).contiguous(memory_format=layout)
            xv = clean.batch(cidx, augment=augment, generator=aug_gen).contiguous(memory_format=layout)
            yield x, y_train[idx], xv, y_clean[cidx]

    def timed(fn):
        for i, batch in enumerate(batches()):  # warm-up, untimed
            fn(*batch)
            if i == 1:
                break
        sync(dev)
        t0 = time.perf_counter()
        for batch in batches():
            fn(*batch)
        sync(dev)
        return time.perf_counter() - t0

    data = SimpleNamespace(train=train, clean=clean, y_observed=y_train, y_clean=y_clean, num_classes=num_classes)
    new_model = lambda: create_model(model, num_classes=num_classes, in_channels=image_shape[0]).to(dev)  # noqa: E731
    steps_of = {"data": lambda *b: None}
    for name in methods:
        step = steps_of[name] = kinds.get(name) or method_step(name)
        if hasattr(step, "method") and hasattr(step.method, "prepare"):
            step.method.prepare(PrepareContext(None, data, dev, new_model, lambda *a, **k: None))
    times = {name: [] for name in steps_of}
    for _ in range(repeats):
        for name, step in steps_of.items():
            times[name].append(timed(step))
    seconds = {name: statistics.median(v) for name, v in times.items()}
    return {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "model": model,
        "num_images": steps * batch_size,
        "batch_size": batch_size,
        "val_batch_size": val_batch_size,
        "image_shape": list(image_shape),
        "amp": amp,
        "channels_last": channels_last,
        "augment": augment,
        "repeats": repeats,
        "seconds": seconds,
        "images_per_second": {k: steps * batch_size / v for k, v in seconds.items()},
    }


def format_epoch_table(result: dict) -> str:
    lines = [header(result, f"{result['num_images']} images"), f"{'epoch':<28}{'seconds':>10}{'images/s':>12}"]
    for k, v in result["seconds"].items():
        lines.append(f"{k:<28}{v:>10.2f}{result['images_per_second'][k]:>12.0f}")
    return "\n".join(lines)


def bench_weights(*, model: str = "small-cnn", batch_size: int = 128, val_batch_size: int = 100,
                  image_shape=(3, 32, 32), num_classes: int = 10, device: str = "cpu", amp: str = "bf16",
                  train_steps: int = 20, seed: int = 0) -> dict:
    """How far approximate meta-weights are from exact float32 ones, on random data.

    The model first takes ``train_steps`` plain CE steps (on batches with learnable labels: the
    class is the sign pattern of a few pixels) so the weights are not those of an untrained net.
    Compared with the float32 JVP: the JVP under ``amp`` autocast, fd in float32, fd under ``amp``.
    Reports Pearson correlation and sign agreement of the raw weights, and the relative L1 error
    of the normalised weights (sum |w - w_exact| / sum |w_exact|).
    """
    dev, net, layout, _, _, _ = step_env(model, batch_size, val_batch_size, image_shape, num_classes, device, "off",
                                       False, seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def data(n):
        x = torch.randn(n, *image_shape, device=dev)
        y = (x.flatten(1)[:, :num_classes] > 0).long().argmax(1)  # learnable labels
        flip = torch.rand(n, device=dev) < 0.4  # 40% symmetric-ish noise on the training side
        return x, y, flip

    for _ in range(train_steps):
        x, y, _ = data(batch_size)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    x, y, flip = data(batch_size)
    y = torch.where(flip, torch.randint(0, num_classes, y.shape, device=dev), y)
    xv, yv, _ = data(val_batch_size)

    def weights(meta_grad, dtype):
        with torch.autocast(dev.type, dtype=AMP[dtype], enabled=AMP[dtype] is not None):
            w = meta_weights(net, x, y, xv, yv, optimizer=opt, meta_grad=meta_grad)
        return torch.cat([w.raw_alpha, w.raw_beta]).double(), torch.cat([w.alpha, w.beta]).double()

    ref_raw, ref_w = weights("exact", "off")
    out = {}
    for name, mg, dt in (("exact_" + amp, "exact", amp), ("fd_fp32", "fd", "off"), ("fd_" + amp, "fd", amp)):
        raw, w = weights(mg, dt)
        out[name] = {
            "pearson_raw": float(torch.corrcoef(torch.stack([raw, ref_raw]))[0, 1]),
            "sign_agreement_raw": float((raw.sign() == ref_raw.sign()).double().mean()),
            "relative_l1_weights": float((w - ref_w).abs().sum() / ref_w.abs().sum().clamp_min(1e-30)),
        }
    return {"device": str(dev), "model": model, "batch_size": batch_size, "val_batch_size": val_batch_size,
            "image_shape": list(image_shape), "versus": "exact float32", "results": out}


def format_weights_table(result: dict) -> str:
    lines = [f"device {result['device']}, model {result['model']}, n={result['batch_size']}, "
             f"m={result['val_batch_size']}, versus the exact float32 weights",
             f"{'weights':<16}{'pearson':>10}{'sign agree':>12}{'rel L1':>10}"]
    for k, v in result["results"].items():
        lines.append(f"{k:<16}{v['pearson_raw']:>10.4f}{v['sign_agreement_raw']:>12.3f}{v['relative_l1_weights']:>10.4f}")
    return "\n".join(lines)
