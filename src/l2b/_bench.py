"""`l2b bench step`: per-step cost of plain CE, the exact L2B step and the double-backward reference.

The three steps run interleaved in one process on the same model and batches, so machine noise
hits them alike; the ratios, not the absolute times, are the result.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ._meta import weighted_forward
from ._models import create_model
from ._reference import reference_meta_weights


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(*, model: str = "small-cnn", batch_size: int = 128, val_batch_size: int = 100,
               image_shape=(3, 32, 32), num_classes: int = 10, device: str = "cpu",
               steps: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """Median seconds per training step of each kind, and their ratios to plain CE."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=num_classes, in_channels=image_shape[0]).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, *image_shape, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    xv = torch.randn(val_batch_size, *image_shape, device=dev)
    yv = torch.randint(0, num_classes, (val_batch_size,), device=dev)

    def finish(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()

    def ce_step():
        finish(F.cross_entropy(net(x), y))

    def weighted_step(logits, alpha, beta, pseudo):
        finish((alpha * F.cross_entropy(logits, y, reduction="none")
                + beta * F.cross_entropy(logits, pseudo, reduction="none")).sum())

    def l2b_step():  # as the trainer does it: the real forward carries the tangent
        w, logits = weighted_forward(net, x, y, xv, yv, optimizer=opt)
        weighted_step(logits, w.alpha, w.beta, w.pseudo)

    def reference_step():  # double backward through a functional look-ahead, then the real step
        alpha, beta, pseudo, _, _ = reference_meta_weights(net, x, y, xv, yv, optimizer=opt)
        weighted_step(net(x), alpha, beta, pseudo)

    kinds = {"ce": ce_step, "l2b_exact": l2b_step, "reference_double_backward": reference_step}
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
        "seconds": median,
        "ratio_to_ce": {k: v / median["ce"] for k, v in median.items()},
        "l2b_over_reference": median["l2b_exact"] / median["reference_double_backward"],
    }


def format_step_table(result: dict) -> str:
    lines = [
        f"device {result['device']} ({result['threads']} threads), model {result['model']}, "
        f"n={result['batch_size']}, m={result['val_batch_size']}, input {tuple(result['image_shape'])}, "
        f"median of {result['steps']} steps",
        f"{'step':<28}{'ms':>10}{'x CE':>8}",
    ]
    for k, v in result["seconds"].items():
        lines.append(f"{k:<28}{1000 * v:>10.2f}{result['ratio_to_ce'][k]:>8.2f}")
    lines.append(f"exact L2B / reference: {result['l2b_over_reference']:.2f}")
    return "\n".join(lines)


def bench_data(*, data_dir: str | None = None, subset: int = 3000, batch_size: int = 128, model: str = "small-cnn",
               device: str = "cpu", repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to feed one Fashion-MNIST epoch (index gather, float conversion, normalisation, with and
    without on-device crop+flip) against one plain CE epoch of ``model`` on the same batches.

    The data feed is what the trainer does per batch (`DeviceImages.batch`); the CE epoch includes
    it. Epochs are interleaved ``repeats`` times and the medians compared.
    """
    from ._data import DeviceImages, channel_stats, load_fashion_mnist
    from ._errors import L2BError

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
