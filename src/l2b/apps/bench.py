"""`l2b bench step` and `l2b bench epoch`.

``step``: per-step cost of plain CE, the exact L2B step, the finite-difference L2B step and the
double-backward reference. The steps run interleaved in one process on the same model and batches,
so machine noise hits them alike; the ratios, not the absolute times, are the result.

``epoch``: images per second of a whole training epoch per method (plain CE, L2B exact, L2B fd, or
any registered method by name: l2rw, mlc, mwnet, ...) over random data of a given shape held on the
device as uint8, as the trainer holds its data, plus the cost of making the batches alone (the data
pipeline).

Every timed step is the method's own ``step`` (the trainer's code) followed by the trainer's update
(backward, clipping at 5, SGD); only the reference is assembled here.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..meta import meta_weights
from ..methods import PrepareContext, StepContext, create_method, list_methods
from ..models import create_model
from ..data.arrays import DeviceImages
from ..errors import L2BError
from ..reference import reference_meta_weights

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(model, batch_size, val_batch_size, image_shape, num_classes, device, amp, channels_last, seed):
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

    def method_step(name: str, meta_grad: str = "exact"):
        method = create_method(name)

        def step(x, y, xv, yv):  # as the trainer does it (the L2B family: the real forward carries the tangent)
            ctx = StepContext(opt, lambda: (xv, yv), 1, num_classes, module=net, meta_grad=meta_grad)
            with autocast():
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

    kinds = {"ce": method_step("ce"), "l2b_exact": method_step("l2b"), "l2b_fd": method_step("l2b", "fd"),
             "reference_double_backward": reference_step}
    return dev, net, layout, kinds, method_step


def bench_step(*, model: str = "small-cnn", batch_size: int = 128, val_batch_size: int = 100,
               image_shape=(3, 32, 32), num_classes: int = 10, device: str = "cpu",
               steps: int = 20, warmup: int = 3, seed: int = 0, amp: str = "off",
               channels_last: bool = False, reference: bool = True) -> dict:
    """Median seconds per training step of each kind, and their ratios to plain CE."""
    dev, net, layout, kinds, _ = _setup(model, batch_size, val_batch_size, image_shape, num_classes, device, amp,
                                        channels_last, seed)
    if not reference:
        kinds.pop("reference_double_backward")
    x = torch.randn(batch_size, *image_shape, device=dev).contiguous(memory_format=layout)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    xv = torch.randn(val_batch_size, *image_shape, device=dev).contiguous(memory_format=layout)
    yv = torch.randint(0, num_classes, (val_batch_size,), device=dev)
    kinds = {k: (lambda fn=fn: fn(x, y, xv, yv)) for k, fn in kinds.items()}
    times = {k: [] for k in kinds}
    net.train()
    for i in range(warmup + steps):
        for name, fn in kinds.items():  # interleaved: drift in machine speed hits all alike
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "model": model,
        "batch_size": batch_size,
        "val_batch_size": val_batch_size,
        "image_shape": list(image_shape),
        "steps": steps,
        "amp": amp,
        "channels_last": channels_last,
        "seconds": median,
        "ratio_to_ce": {k: v / median["ce"] for k, v in median.items()},
        "l2b_over_reference": (median["l2b_exact"] / median["reference_double_backward"]
                               if "reference_double_backward" in median else None),
    }


def _header(result: dict, extra: str) -> str:
    return (f"device {result['device']} ({result['threads']} threads), model {result['model']}, "
            f"n={result['batch_size']}, m={result['val_batch_size']}, input {tuple(result['image_shape'])}, "
            f"amp {result['amp']}, channels-last {result['channels_last']}, {extra}")


def format_step_table(result: dict) -> str:
    lines = [_header(result, f"median of {result['steps']} steps"), f"{'step':<28}{'ms':>10}{'x CE':>8}"]
    for k, v in result["seconds"].items():
        lines.append(f"{k:<28}{1000 * v:>10.2f}{result['ratio_to_ce'][k]:>8.2f}")
    if result["l2b_over_reference"] is not None:
        lines.append(f"exact L2B / reference: {result['l2b_over_reference']:.2f}")
    return "\n".join(lines)


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
    dev, net, layout, kinds, method_step = _setup(model, batch_size, val_batch_size, image_shape, num_classes,
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
        _sync(dev)
        t0 = time.perf_counter()
        for batch in batches():
            fn(*batch)
        _sync(dev)
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
    lines = [_header(result, f"{result['num_images']} images"), f"{'epoch':<28}{'seconds':>10}{'images/s':>12}"]
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
    dev, net, layout, _, _ = _setup(model, batch_size, val_batch_size, image_shape, num_classes, device, "off",
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


def bench_data(*, data_dir: str | None = None, subset: int = 3000, batch_size: int = 128, model: str = "small-cnn",
               device: str = "cpu", repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to feed one Fashion-MNIST epoch (index gather, float conversion, normalisation, with and
    without on-device crop+flip) against one plain CE epoch of ``model`` on the same batches.

    The data feed is what the trainer does per batch (`DeviceImages.batch`); the CE epoch includes
    it. Epochs are interleaved ``repeats`` times and the medians compared.
    """
    from ..data.arrays import channel_stats
    from ..data.benchmarks import load_fashion_mnist

    dev = torch.device(device)
    try:
        data = load_fashion_mnist(data_dir, download=False)
        x, y, source = data.x_train[:subset], data.y_train[:subset], "fashion-mnist"
    except L2BError:  # the feed cost depends on shapes, not pixels
        rng = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (subset, 1, 28, 28), generator=rng, dtype=torch.uint8).numpy()
        y, source = torch.randint(0, 10, (subset,), generator=rng).numpy(), "random uint8 1x28x28 (Fashion-MNIST not found)"
    mean, std = channel_stats(x)
    images = DeviceImages(x, dev, mean, std)
    labels = torch.as_tensor(y).to(dev)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=10, in_channels=1).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    steps = len(x) // batch_size

    def epoch(train: bool, augment: bool) -> None:
        perm = torch.randperm(len(x), generator=gen).to(dev)
        for b in range(steps):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            xb, yb = images.batch(idx, augment=augment, generator=gen), labels[idx]
            if train:
                loss = F.cross_entropy(net(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    kinds = {"feed": (False, False), "feed_augment": (False, True), "ce_epoch": (True, False)}
    times = {k: [] for k in kinds}
    net.train()
    epoch(True, False)  # warm-up
    for _ in range(repeats):
        for name, (train, augment) in kinds.items():
            _sync(dev)
            t0 = time.perf_counter()
            epoch(train, augment)
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": str(dev), "threads": torch.get_num_threads(), "source": source, "images": len(x),
        "batch_size": batch_size, "model": model, "repeats": repeats, "seconds": median,
        "feed_over_ce_epoch": median["feed"] / median["ce_epoch"],
        "feed_augment_over_ce_epoch": median["feed_augment"] / median["ce_epoch"],
    }


def format_data_table(result: dict) -> str:
    return "\n".join([
        f"device {result['device']} ({result['threads']} threads), {result['source']}, {result['images']} images, "
        f"batch {result['batch_size']}, model {result['model']}, median of {result['repeats']} epochs",
        f"{'epoch':<28}{'s':>10}{'% of CE':>10}",
        *(f"{k:<28}{v:>10.3f}{100 * v / result['seconds']['ce_epoch']:>10.1f}" for k, v in result["seconds"].items()),
    ])
