"""Data parallelism on CPU with gloo: K ranks must match one process over the same global batch."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import l2b
from l2b._distributed import average_tensors, strip_nproc
from l2b._methods import StepContext, create_method

WORLD = 2
N, M, STEPS = 12, 8, 3  # global batch, global clean batch
CASES = [  # (method, normalize, meta_grad)
    ("l2b", "sum", "exact"),
    ("l2b", "softmax", "exact"),
    ("l2rw", "sum", "exact"),
    ("l2b-convex", "sum", "exact"),
    ("l2b", "sum", "fd"),
]


def _net():
    # no BatchNorm: per-sample losses do not couple across the ranks' shards
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(N, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 4, (N,), generator=g),
             torch.randn(M, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 4, (M,), generator=g))
            for _ in range(STEPS)]


def _train(case, rank=0, world=1, wrap=lambda m: m):
    """STEPS real steps of ``case`` on this rank's shard; returns (weights per step, final parameters)."""
    method_name, normalize, meta_grad = case
    module = _net()
    model = wrap(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    method = create_method(method_name, normalize=normalize)
    weights = []
    for x, y, xv, yv in _batches():
        n, m = N // world, M // world
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        xv, yv = xv[rank * m : (rank + 1) * m], yv[rank * m : (rank + 1) * m]
        ctx = StepContext(opt, lambda: (xv, yv), 1, 4, module=module, world_size=world, meta_grad=meta_grad)
        result = method.step(model, x, y, ctx)
        opt.zero_grad()
        result.loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        opt.step()
        weights.append(torch.stack([result.alpha, result.beta]))
    return torch.cat(weights, dim=1), [p.detach().clone() for p in module.parameters()]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {case: _train(case, rank, world, nn.parallel.DistributedDataParallel) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case in CASES:
        single_w, single_p = _train(case)
        steps_w = single_w.view(2, STEPS, N)
        got_w = torch.cat([rk[case][0].view(2, STEPS, N // WORLD) for rk in ranks], dim=2)
        assert torch.allclose(got_w, steps_w, rtol=0, atol=1e-10), (case, (got_w - steps_w).abs().max())
        for rk in ranks:  # every rank ends with the single process's parameters
            for a, b in zip(rk[case][1], single_p):
                assert torch.allclose(a, b, rtol=0, atol=1e-10), case
        assert steps_w.abs().sum() > 0  # the comparison is not of zeros


def test_per_rank_normalisation_would_differ():
    # the global normaliser is the point: normalising each shard alone gives other weights
    raw_a, raw_b = torch.rand(8, dtype=torch.float64) - 0.3, torch.rand(8, dtype=torch.float64) - 0.3
    full = l2b.normalize_weights(raw_a, raw_b)[0]
    halves = torch.cat([l2b.normalize_weights(raw_a[:4], raw_b[:4])[0], l2b.normalize_weights(raw_a[4:], raw_b[4:])[0]])
    assert not torch.allclose(full, halves)


def test_single_process_helpers_are_identity():
    d = {"a": torch.ones(2)}
    assert average_tensors(d) is d


def test_strip_nproc():
    assert strip_nproc(["train", "--nproc", "2", "--epochs", "1", "--nproc=3"]) == ["train", "--epochs", "1"]


def test_cli_nproc_2_writes_one_run_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from l2b._data import DEBIAN_FASHION_MNIST, fashion_mnist_dirs

    if not any((d / "train-images-idx3-ubyte.gz").is_file() for d in fashion_mnist_dirs(None)):
        pytest.skip(f"Fashion-MNIST is not installed ({DEBIAN_FASHION_MNIST})")
    src = str(Path(l2b.__file__).parents[1])
    monkeypatch.setenv("PYTHONPATH", src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(tmp_path)
    from l2b.cli import main

    code = main(["train", "--subset", "200", "--val-size", "50", "--epochs", "1", "--warmup-epochs", "0",
                 "--batch-size", "50", "--val-batch-size", "50", "--quiet", "--nproc", "2", "--device", "cpu"])
    assert code == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 wrote nothing
    assert {"config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in runs[0].iterdir()}
    assert len((runs[0] / "metrics.jsonl").read_text().splitlines()) == 1  # one writer, one line per epoch
