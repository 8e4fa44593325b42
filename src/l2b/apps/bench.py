"""`l2b bench step | epoch | weights | data | ddp`.

``step``: per-step cost of plain CE, the exact L2B step (fused as the trainer runs it, with the fast
tangent rules of :mod:`l2b.fastnorm` and with PyTorch's generic ones, and unfused), the
finite-difference L2B step, the double-backward reference and, with ``peer="higher"``, the published
recipe (a ``higher``-based double backward); plus the components an exact step is made of, from
which it prints the floor of an exact step. The steps run interleaved in one process on the same
model and batches, so machine noise hits them alike; the ratios, not the absolute times, are the
result: each kind's ratio to CE is the median of its per-round ratios (paired). With ``memory`` each
kind's peak memory over one step is measured in a fresh process.

``epoch``: images per second of a whole training epoch per method (plain CE, L2B exact, L2B fd, or
any registered method by name: l2rw, mlc, mwnet, ...) over random data of a given shape held on the
device as uint8, as the trainer holds its data, plus the cost of making the batches alone (the data
pipeline).

``data``: the cost of feeding a Fashion-MNIST epoch against a CE epoch; with ``--stream``, image files
decoded per batch by the streaming reader: images/s per worker and the share of a step spent waiting.

``ddp``: the fused against the unfused L2B step under DistributedDataParallel, gloo ranks on the CPU,
as a paired ratio; with ``--compile``, whether the fused forward runs through torch.compile.

Every timed step is the method's own ``step`` (the trainer's code) followed by the trainer's update
(backward, clipping at 5, SGD); only the reference is assembled here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..meta import clean_direction, dual_forward, meta_mode, meta_weights
from ..methods import PrepareContext, StepContext, create_method, list_methods
from ..models import create_model
from ..data.arrays import DeviceImages
from ..errors import L2BError
from ..reference import reference_meta_weights
from ..fastnorm import native_tangents

try:
    import higher

    has_higher = True
except ImportError:
    has_higher = False

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = ("higher",)


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


def _components(env, x, y, xv, yv):
    """The parts an exact step is made of, each timed alone: name -> fn()."""
    net, opt, autocast = env.net, env.opt, env.autocast
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    with meta_mode(net), autocast():
        v = {n: t.detach() for n, t in clean_direction(net, xv, yv, params, opt).items()}

    def forward():  # the real forward, graph built and dropped
        with autocast():
            net(x)

    def forward_backward():
        with autocast():
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        env.scaler.scale(loss).backward()

    def clean_pass():  # v = s * grad G(theta'): the clean batch's forward and backward at the look-ahead point
        with meta_mode(net), autocast():
            clean_direction(net, xv, yv, params, opt)

    def dual(generic=False):  # the real forward carrying the tangent, as in the fused step
        with autocast(), native_tangents() if generic else contextlib.nullcontext():
            dual_forward(net, x, params, v)

    return {"forward": forward, "forward_backward": forward_backward, "clean_pass": clean_pass,
            "dual_forward": dual, "dual_forward_generic": lambda: dual(generic=True)}


def _random_batch(dev, layout, batch_size, val_batch_size, image_shape, num_classes):
    x = torch.randn(batch_size, *image_shape, device=dev).contiguous(memory_format=layout)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    xv = torch.randn(val_batch_size, *image_shape, device=dev).contiguous(memory_format=layout)
    yv = torch.randint(0, num_classes, (val_batch_size,), device=dev)
    return x, y, xv, yv


STEP_KINDS = ("ce", "l2b_exact", "l2b_exact_generic", "l2b_unfused", "l2b_fd", "reference_double_backward")


def bench_step(*, model: str = "small-cnn", batch_size: int = 128, val_batch_size: int = 100,
               image_shape=(3, 32, 32), num_classes: int = 10, device: str = "cpu",
               steps: int = 20, warmup: int = 3, seed: int = 0, amp: str = "off",
               channels_last: bool = False, reference: bool = True, peer: str | None = None,
               memory: bool = False) -> dict:
    """Seconds per training step of each kind (median, min, paired ratio to CE), the components and the floor.

    Kinds: ``ce``; ``l2b_exact`` (the trainer's fused step, fast tangent rules); ``l2b_exact_generic``
    (the same with PyTorch's generic forward-mode rules); ``l2b_unfused`` (``meta_weights``, then a
    separate real forward); ``l2b_fd``; ``reference_double_backward`` (unless ``reference=False``);
    ``peer_higher`` with ``peer="higher"`` (:func:`higher_meta_weights`). Every round runs each kind
    once, then each component (forward, forward + backward, the clean pass, the dual forward with
    either rules); ratios are medians of per-round ratios. The floor of an exact step is a CE step +
    the clean pass + one backward (forward_backward - forward), the cost of a tangent taken to be a
    backward's. ``memory``: each kind's peak memory over one step, in a fresh process (see
    :func:`peak_memory_of_step`).
    """
    if peer is not None and peer not in PEERS:
        raise L2BError(f"--peer must be one of {', '.join(PEERS)}, got {peer!r}")
    if peer == "higher" and not has_higher:
        raise L2BError("--peer higher needs the `higher` package: pip install higher")
    dev, net, layout, all_kinds, _, env = _setup(model, batch_size, val_batch_size, image_shape, num_classes,
                                                 device, amp, channels_last, seed)
    names = [k for k in STEP_KINDS if reference or k != "reference_double_backward"]
    names += [f"peer_{peer}"] if peer else []
    batch = _random_batch(dev, layout, batch_size, val_batch_size, image_shape, num_classes)
    kinds = {k: (lambda fn=all_kinds[k]: fn(*batch)) for k in names}
    parts = _components(env, *batch)
    times = {k: [] for k in (*kinds, *parts)}
    net.train()
    for i in range(warmup + steps):
        for name, fn in (*kinds.items(), *parts.items()):  # interleaved: drift in machine speed hits all alike
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}

    def paired(k, base):  # median over rounds of the round's ratio
        return statistics.median(a / b for a, b in zip(times[k], times[base]))

    backward = [fb - f for fb, f in zip(times["forward_backward"], times["forward"])]
    floor = [ce + clean + b for ce, clean, b in zip(times["ce"], times["clean_pass"], backward)]
    floor_ratio = statistics.median(f / ce for f, ce in zip(floor, times["ce"]))
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "model": model,
        "batch_size": batch_size,
        "val_batch_size": val_batch_size,
        "image_shape": list(image_shape),
        "steps": steps,
        "amp": amp,
        "channels_last": channels_last,
        "seconds": {k: median[k] for k in kinds},
        "min_seconds": {k: min(times[k]) for k in kinds},
        "ratio_to_ce": {k: paired(k, "ce") for k in kinds},
        "components": {k: median[k] for k in parts},
        "components_min": {k: min(times[k]) for k in parts},
        "components_ratio_to_forward": {k: paired(k, "forward") for k in parts},
        "floor_seconds": statistics.median(floor),
        "floor_ratio_to_ce": floor_ratio,
        "exact_over_floor": paired("l2b_exact", "ce") / floor_ratio,
        "l2b_over_reference": paired("l2b_exact", "reference_double_backward") if reference else None,
        "l2b_over_peer": paired("l2b_exact", f"peer_{peer}") if peer else None,
    }
    if memory:
        config = dict(model=model, batch_size=batch_size, val_batch_size=val_batch_size, image_shape=list(image_shape),
                      num_classes=num_classes, device=device, amp=amp, channels_last=channels_last, seed=seed)
        result["peak_memory_mib"] = {k: _peak_memory_in_child({**config, "kind": k}) for k in kinds}
    return result


def peak_memory_of_step(config: dict) -> float | None:
    """MiB that one step of ``config["kind"]`` takes at its peak above what is held before it.

    ``config``: the kind and :func:`bench_step`'s model, batch and device settings. Two steps run
    first (optimizer state, allocator caches). CUDA: the peak of allocated memory; CPU: the peak
    resident set (Linux: reset through /proc/self/clear_refs; None elsewhere), meaningful in a
    process of its own with glibc's mmap threshold fixed, so that freed tensors go back to the
    system (as :func:`bench_step` runs it).
    """
    c = config
    dev, net, layout, kinds, _, _ = _setup(c["model"], c["batch_size"], c["val_batch_size"], tuple(c["image_shape"]),
                                           c["num_classes"], c["device"], c["amp"], c["channels_last"], c["seed"])
    batch = _random_batch(dev, layout, c["batch_size"], c["val_batch_size"], tuple(c["image_shape"]),
                          c["num_classes"])
    step = kinds[c["kind"]]
    net.train()
    for _ in range(2):
        step(*batch)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step(*batch)
        _sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        base = _proc_status_kib("VmRSS")
        step(*batch)
        return (_proc_status_kib("VmHWM") - base) / 1024
    except OSError:
        return None


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _peak_memory_in_child(config: dict) -> float | None:
    """:func:`peak_memory_of_step` in a fresh Python process (same threads, mmap threshold fixed at 64 KiB)."""
    code = (f"import json, sys; from {__name__} import peak_memory_of_step; "
            "print(json.dumps(peak_memory_of_step(json.loads(sys.argv[1]))))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(config)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise L2BError(f"the memory probe of {config['kind']!r} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _header(result: dict, extra: str) -> str:
    return (f"device {result['device']} ({result['threads']} threads), model {result['model']}, "
            f"n={result['batch_size']}, m={result['val_batch_size']}, input {tuple(result['image_shape'])}, "
            f"amp {result['amp']}, channels-last {result['channels_last']}, {extra}")


def format_step_table(result: dict) -> str:
    memory = result.get("peak_memory_mib")
    lines = [_header(result, f"{result['steps']} interleaved rounds"),
             f"{'step':<28}{'median ms':>10}{'min ms':>10}{'x CE':>8}" + (f"{'peak MiB':>10}" if memory else "")]
    for k, v in result["seconds"].items():
        row = f"{k:<28}{1000 * v:>10.2f}{1000 * result['min_seconds'][k]:>10.2f}{result['ratio_to_ce'][k]:>8.2f}"
        if memory:
            row += f"{memory[k]:>10.1f}" if memory[k] is not None else f"{'n/a':>10}"
        lines.append(row)
    lines.append(f"floor of an exact step (CE step + clean_pass + one backward): {1000 * result['floor_seconds']:.2f} ms, "
                 f"{result['floor_ratio_to_ce']:.2f}x CE; l2b_exact is {result['exact_over_floor']:.2f}x the floor")
    for key, name in (("l2b_over_reference", "the double-backward reference"), ("l2b_over_peer", "the peer")):
        if result.get(key) is not None:
            lines.append(f"l2b_exact / {name}: {result[key]:.2f}")
    if memory and memory.get("l2b_exact") and memory.get("l2b_unfused"):
        lines.append(f"peak memory, fused / unfused exact step: {memory['l2b_exact'] / memory['l2b_unfused']:.2f}")
    lines.append(f"{'component':<28}{'median ms':>10}{'min ms':>10}{'x fwd':>8}")
    for k, v in result["components"].items():
        lines.append(f"{k:<28}{1000 * v:>10.2f}{1000 * result['components_min'][k]:>10.2f}"
                     f"{result['components_ratio_to_forward'][k]:>8.2f}")
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
    dev, net, layout, kinds, method_step, _ = _setup(model, batch_size, val_batch_size, image_shape, num_classes,
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
    dev, net, layout, _, _, _ = _setup(model, batch_size, val_batch_size, image_shape, num_classes, device, "off",
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


def bench_ddp(*, model: str = "small-cnn", nproc: int = 2, batch_size: int = 128, val_batch_size: int = 100,
              image_shape=(1, 28, 28), num_classes: int = 10, steps: int = 10, warmup: int = 2, seed: int = 0,
              check_compile: bool = False) -> dict:
    """Fused against unfused L2B steps under DistributedDataParallel: ``nproc`` gloo ranks on this CPU.

    Fused: the real forward through the DDP wrapper carries the JVP's tangent (one forward); unfused:
    the JVP forward on the plain module, then a second, plain forward through the wrapper (what
    ``--sync-bn`` and ``--compile`` run). Each timed step is the method's ``step`` and the update
    (backward with DDP's all-reduce, clipping at 5, SGD); the two kinds alternate, which one goes first
    alternating too, on one model and optimizer. The result is the median of the per-step-pair
    ratios fused / unfused (paired, so machine drift cancels), with the median seconds of each kind.
    With ``check_compile``, ``fused_checks["compile"]`` says whether the fused forward runs through a
    torch.compile'd module: "ok" or the error it raised. (SyncBatchNorm cannot be checked here: it runs
    only on GPUs.)
    Each rank uses one thread, so ``nproc`` should not exceed the cores.
    """
    import tempfile

    import torch.multiprocessing as mp

    if nproc < 2:
        raise L2BError(f"--nproc must be >= 2 for a data-parallel benchmark, got {nproc}")
    if steps < 1:
        raise L2BError(f"--steps must be >= 1, got {steps}")
    if batch_size % nproc or val_batch_size % nproc:
        raise L2BError(f"--batch-size ({batch_size}) and --val-batch-size ({val_batch_size}) are global batches "
                       f"and must be divisible by --nproc ({nproc})")
    settings = dict(model=model, batch_size=batch_size, val_batch_size=val_batch_size, image_shape=list(image_shape),
                    num_classes=num_classes, steps=steps, warmup=warmup, seed=seed)
    with tempfile.TemporaryDirectory(prefix="l2b-bench-ddp-") as tmp:
        mp.spawn(_ddp_bench_rank, args=(nproc, tmp, settings), nprocs=nproc, join=True)
        times = torch.load(f"{tmp}/rank0.pt")
    ratios = [f / u for f, u in zip(times["fused"], times["unfused"])]
    checks = {"compile": fused_compile_check(model=model, image_shape=image_shape, num_classes=num_classes)} if check_compile else {}
    return {"device": "cpu", "backend": "gloo", "nproc": nproc, "threads_per_rank": 1, **settings,
            "seconds": {k: statistics.median(times[k]) for k in ("fused", "unfused")},
            "fused_over_unfused": statistics.median(ratios), "pair_ratios": ratios, "fused_checks": checks,
            "torch": torch.__version__}


def _ddp_bench_rank(rank: int, nproc: int, tmp: str, s: dict) -> None:
    """One rank of :func:`bench_ddp` (spawned; a file store, so no port is needed)."""
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=nproc)
    try:
        torch.manual_seed(s["seed"])
        net = create_model(s["model"], num_classes=s["num_classes"], in_channels=s["image_shape"][0])
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        method = create_method("l2b")
        g = torch.Generator().manual_seed(s["seed"] + 1 + rank)  # each rank its own shard
        n, m = s["batch_size"] // nproc, s["val_batch_size"] // nproc
        x, xv = torch.randn(n, *s["image_shape"], generator=g), torch.randn(m, *s["image_shape"], generator=g)
        y = torch.randint(0, s["num_classes"], (n,), generator=g)
        yv = torch.randint(0, s["num_classes"], (m,), generator=g)

        def step(fuse: bool) -> None:
            ctx = StepContext(opt, lambda: (xv, yv), 1, s["num_classes"], module=net, world_size=nproc,
                              fuse_forward=fuse)
            loss = method.step(ddp, x, y, ctx).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()

        times = {"fused": [], "unfused": []}
        net.train()
        for i in range(s["warmup"] + s["steps"]):
            for fuse in ((True, False) if i % 2 == 0 else (False, True)):
                dist.barrier()  # every rank starts the step together: the all-reduces do not wait on a straggler
                t0 = time.perf_counter()
                step(fuse)
                if i >= s["warmup"]:
                    times["fused" if fuse else "unfused"].append(time.perf_counter() - t0)
        if rank == 0:
            torch.save(times, f"{tmp}/rank0.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fused_compile_check(*, model: str = "small-cnn", image_shape=(1, 28, 28), num_classes: int = 10) -> str:
    """Whether the fused forward (meta.weighted_forward) runs through a torch.compile'd module, in one
    process: "ok" when it does and gives the eager weights and logits (to 1e-4), else the error it raised."""
    from ..meta import weighted_forward

    torch.manual_seed(0)
    net = create_model(model, num_classes=num_classes, in_channels=image_shape[0])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, xv = torch.randn(16, *image_shape), torch.randn(8, *image_shape)
    y, yv = torch.randint(0, num_classes, (16,)), torch.randint(0, num_classes, (8,))
    eager_w, eager_logits = weighted_forward(copy.deepcopy(net), x, y, xv, yv, optimizer=opt)
    try:
        w, logits = weighted_forward(net, x, y, xv, yv, optimizer=opt, wrapper=torch.compile(net))
    except Exception as exc:  # dynamo/inductor raise many types; the message is the measured reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    same = torch.allclose(w.alpha, eager_w.alpha, atol=1e-4) and torch.allclose(logits, eager_logits, atol=1e-4)
    return "ok" if same else "runs, but its weights or logits differ from the eager ones"


def format_ddp_table(result: dict) -> str:
    lines = [f"{result['nproc']} gloo ranks on the CPU ({result['threads_per_rank']} thread each), model "
             f"{result['model']}, global n={result['batch_size']}, m={result['val_batch_size']}, input "
             f"{tuple(result['image_shape'])}, median of {result['steps']} step pairs",
             f"{'L2B step under DDP':<28}{'ms':>10}",
             *(f"{k:<28}{1000 * v:>10.2f}" for k, v in result["seconds"].items()),
             f"fused / unfused (paired): {result['fused_over_unfused']:.3f}"]
    lines += [f"fused forward with {k}: {v}" for k, v in result["fused_checks"].items()]
    return "\n".join(lines)


def write_jpegs(folder, *, num_images: int, size: int, seed: int = 0) -> list:
    """``num_images`` generated RGB JPEGs of size x size in ``folder`` (smooth colour fields plus noise, so
    they compress like photographs rather than like white noise); returns their paths in order."""
    from pathlib import Path

    import numpy as np

    from ..data.images import pil

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

    from ..data.arrays import StreamingImages
    from ..data.images import ImageFiles

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
            _, _, _, kinds, _, _ = _setup(model, batch_size, val_batch_size, (3, size, size), 10, "cpu", "off", False,
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
