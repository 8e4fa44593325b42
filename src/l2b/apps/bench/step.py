"""`l2b bench step`: per-step cost of every kind of step, interleaved in one process, with the floor
and, on request, each kind's peak memory (measured in a fresh process)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ...errors import L2BError
from ...fastnorm import native_tangents
from ...meta import clean_direction, dual_forward, meta_mode
from .common import PEERS, has_higher, header, random_batch, step_env, sync


STEP_KINDS = ("ce", "l2b_exact", "l2b_exact_generic", "l2b_unfused", "l2b_fd", "reference_double_backward")


def _nothing():  # the setup of a part that needs none
    return None


def _components(env, x, y, xv, yv):
    """The parts an exact step is made of, each timed alone: name -> (setup, fn); only fn(setup()) is timed."""
    net, opt, autocast = env.net, env.opt, env.autocast
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    with meta_mode(net), autocast():
        v = {n: t.detach() for n, t in clean_direction(net, xv, yv, params, opt).items()}

    def forward():  # the real forward, graph built and dropped
        with autocast():
            net(x)

    def loss():  # untimed setup of `backward`: a difference of two noisy timings can come out negative
        opt.zero_grad(set_to_none=True)
        with autocast():
            return env.scaler.scale(F.cross_entropy(net(x), y))

    def backward(scaled_loss):
        scaled_loss.backward()

    def clean_pass():  # v = s * grad G(theta'): the clean batch's forward and backward at the look-ahead point
        with meta_mode(net), autocast():
            clean_direction(net, xv, yv, params, opt)

    def dual(generic=False):  # the real forward carrying the tangent, as in the fused step
        with autocast(), native_tangents() if generic else contextlib.nullcontext():
            dual_forward(net, x, params, v)

    parts = {"forward": forward, "clean_pass": clean_pass, "dual_forward": dual,
             "dual_forward_generic": lambda: dual(generic=True)}
    return {"backward": (loss, backward), **{k: (_nothing, lambda _, fn=fn: fn()) for k, fn in parts.items()}}


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
    once, then each component (forward, backward of a CE loss, the clean pass, the dual forward with
    either rules); ratios are medians of per-round ratios. The floor of an exact step is a CE step +
    the clean pass + one backward, the cost of a tangent taken to be a
    backward's. ``memory``: each kind's peak memory over one step, in a fresh process (see
    :func:`peak_memory_of_step`).
    """
    if peer is not None and peer not in PEERS:
        raise L2BError(f"--peer must be one of {', '.join(PEERS)}, got {peer!r}")
    if peer == "higher" and not has_higher:
        raise L2BError("--peer higher needs the `higher` package: pip install higher")
    dev, net, layout, all_kinds, _, env = step_env(model, batch_size, val_batch_size, image_shape, num_classes,
                                                 device, amp, channels_last, seed)
    names = [k for k in STEP_KINDS if reference or k != "reference_double_backward"]
    names += [f"peer_{peer}"] if peer else []
    batch = random_batch(dev, layout, batch_size, val_batch_size, image_shape, num_classes)
    kinds = {k: (_nothing, lambda _, fn=all_kinds[k]: fn(*batch)) for k in names}
    parts = _components(env, *batch)
    times = {k: [] for k in (*kinds, *parts)}
    net.train()
    for i in range(warmup + steps):
        for name, (setup, fn) in (*kinds.items(), *parts.items()):  # interleaved: drift hits all alike
            arg = setup()
            sync(dev)
            t0 = time.perf_counter()
            fn(arg)
            sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}

    def paired(k, base):  # median over rounds of the round's ratio
        return statistics.median(a / b for a, b in zip(times[k], times[base]))

    floor = [ce + clean + b for ce, clean, b in zip(times["ce"], times["clean_pass"], times["backward"])]
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
    dev, net, layout, kinds, _, _ = step_env(c["model"], c["batch_size"], c["val_batch_size"], tuple(c["image_shape"]),
                                           c["num_classes"], c["device"], c["amp"], c["channels_last"], c["seed"])
    batch = random_batch(dev, layout, c["batch_size"], c["val_batch_size"], tuple(c["image_shape"]),
                          c["num_classes"])
    step = kinds[c["kind"]]
    net.train()
    for _ in range(2):
        step(*batch)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step(*batch)
        sync(dev)
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


def format_step_table(result: dict) -> str:
    memory = result.get("peak_memory_mib")
    lines = [header(result, f"{result['steps']} interleaved rounds"),
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
