"""`l2b bench data`: the cost of feeding an epoch; with ``--stream``, image files decoded per batch."""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from ...data.arrays import DeviceImages
from ...errors import L2BError
from ...models import create_model
from .common import step_env, sync


def bench_data(*, data_dir: str | None = None, subset: int = 3000, batch_size: int = 128, model: str = "small-cnn",
               device: str = "cpu", repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to feed one Fashion-MNIST epoch (index gather, float conversion, normalisation, with and
    without on-device crop+flip) against one plain CE epoch of ``model`` on the same batches.

    The data feed is what the trainer does per batch (`DeviceImages.batch`); the CE epoch includes
    it. Epochs are interleaved ``repeats`` times and the medians compared.
    """
    from ...data.arrays import channel_stats
    from ...data.benchmarks import load_fashion_mnist

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
            sync(dev)
            t0 = time.perf_counter()
            epoch(train, augment)
            sync(dev)
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


def write_jpegs(folder, *, num_images: int, size: int, seed: int = 0) -> list:
    """``num_images`` generated RGB JPEGs of size x size in ``folder`` (smooth colour fields plus noise, so
    they compress like photographs rather than like white noise); returns their paths in order."""
    from pathlib import Path

    import numpy as np

    from ...data.images import pil

    Image = pil()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def bench_stream(*, image_sizes=(64, 224), num_images: int = 512, workers=(0, 1, 2), batch_size: int = 64,
                 val_batch_size: int = 32, model: str = "small-cnn", repeats: int = 2, seed: int = 0) -> dict:
    """``--stream`` on the CPU: images/s decoded per worker, and the share of an L2B step spent waiting for data.

    For each size, ``num_images`` generated JPEGs (:func:`write_jpegs`, in a temporary folder) are read
    by the trainer's streaming reader (``StreamingImages``, Pillow in DataLoader workers; 0 workers =
    in the training process). A step needs a training batch (``batch_size``) and a clean batch
    (``val_batch_size``) decoded, then the exact L2B step of ``model`` (the method's step, backward,
    SGD) on them. The reader decodes a batch when the step asks for it, so the step waits for all of
    it: wait share = decode / (decode + compute), per step, median. Every worker count decodes the
    same batches, interleaved with one timed step each, over ``repeats`` passes over the files.
    ``workers_to_keep_up`` is the fewest workers, at one worker's measured rate, that decode a step's
    images in no more time than the step computes (above it, compute dominates the step).
    """
    import math
    import tempfile

    from ...data.arrays import StreamingImages
    from ...data.images import ImageFiles

    if min(workers) < 0 or repeats < 1 or batch_size < 2 or num_images < batch_size + val_batch_size:
        raise L2BError("bench data --stream needs workers >= 0, --repeats >= 1, batch size >= 2 and "
                       f"--num-images >= batch size + clean batch ({batch_size + val_batch_size})")
    per_step = batch_size + val_batch_size
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="l2b-bench-stream-") as tmp:
        for size in image_sizes:
            files = ImageFiles(write_jpegs(f"{tmp}/{size}", num_images=num_images, size=size, seed=seed), size, 3)
            readers = {w: StreamingImages(files, torch.device("cpu"), torch.zeros(3), torch.ones(3), workers=w)
                       for w in workers}
            _, _, _, kinds, _, _ = step_env(model, batch_size, val_batch_size, (3, size, size), 10, "cpu", "off", False,
                                       seed)
            step = kinds["l2b_exact"]
            g = torch.Generator().manual_seed(seed)
            y, yv = torch.randint(0, 10, (batch_size,), generator=g), torch.randint(0, 10, (val_batch_size,), generator=g)
            decode = {w: [] for w in workers}
            compute = []
            warm = torch.arange(per_step)
            for reader in readers.values():  # starts the workers; not timed (the median absorbs a slow first step)
                reader.batch(warm)
            for _ in range(repeats):
                perm = torch.randperm(num_images, generator=g)
                for b in range(num_images // per_step):
                    idx = perm[b * per_step : (b + 1) * per_step]
                    for w in (workers if b % 2 == 0 else workers[::-1]):
                        t0 = time.perf_counter()
                        x, xv = readers[w].batch(idx[:batch_size]), readers[w].batch(idx[batch_size:])
                        decode[w].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    step(x, y, xv, yv)
                    compute.append(time.perf_counter() - t0)
            del readers  # ends the workers
            step_s = statistics.median(compute)
            rates = {w: per_step * len(v) / sum(v) for w, v in decode.items()}
            one = rates.get(1, rates[max(workers)] / max(max(workers), 1))
            sizes[str(size)] = {  # keyed by str(workers), as in the JSON
                "images_per_second": {str(w): r for w, r in rates.items()},
                "images_per_second_per_worker": {str(w): r / max(w, 1) for w, r in rates.items()},
                "wait_share": {str(w): statistics.median(d / (d + c) for d, c in zip(v, compute))
                               for w, v in decode.items()},
                "step_compute_seconds": step_s,
                "workers_to_keep_up": max(1, math.ceil(per_step / (one * step_s))),
            }
    return {"device": "cpu", "threads": torch.get_num_threads(), "cores": os.cpu_count(), "model": model,
            "method": "l2b (exact)", "batch_size": batch_size, "val_batch_size": val_batch_size,
            "num_images": num_images, "repeats": repeats, "workers": list(workers), "format": "JPEG, quality 90, RGB",
            "sizes": sizes}


def format_stream_table(result: dict) -> str:
    lines = [f"--stream on the CPU ({result['cores']} cores, {result['threads']} thread(s) per step), "
             f"{result['num_images']} generated JPEGs per size, n={result['batch_size']} + m={result['val_batch_size']} "
             f"images per step, {result['method']} step of {result['model']}",
             f"{'size':>6}{'workers':>9}{'images/s':>10}{'per worker':>12}{'wait share':>12}{'step ms':>9}"]
    for size, r in result["sizes"].items():
        for w in map(str, result["workers"]):
            lines.append(f"{size:>6}{w:>9}{r['images_per_second'][w]:>10.0f}{r['images_per_second_per_worker'][w]:>12.0f}"
                         f"{100 * r['wait_share'][w]:>11.0f}%{1000 * r['step_compute_seconds']:>9.0f}")
        lines.append(f"{'':>6} workers to keep up with this step: {r['workers_to_keep_up']}")
    return "\n".join(lines)
