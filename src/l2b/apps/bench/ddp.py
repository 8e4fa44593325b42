"""`l2b bench ddp`: the fused against the unfused L2B step under DDP (gloo ranks on the CPU), and
whether torch.compile takes the fused forward."""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ...errors import L2BError
from ...methods import StepContext, create_method
from ...models import create_model


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
    from ...meta import weighted_forward

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
