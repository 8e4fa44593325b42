"""Data parallelism on CPU with gloo: K ranks must match one process over the same global batch."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import l2b

pytestmark = pytest.mark.xdist_group("ddp")  # one worker runs this module's process groups, in turn
from l2b.train.checkpoint import safe_load
from l2b.parallel import average_tensors
from l2b.train.distributed import strip_nproc
from l2b.methods import StepContext, create_method

WORLD = 2
FD_RELATIVE_ERROR = torch.finfo(torch.float64).eps ** 0.5  # rounding of a forward difference at its step
N, M, STEPS = 12, 8, 3  # global batch, global clean batch
CASES = [  # (method, normalize, meta_grad, fuse_forward: the real forward through DDP carries the tangent[, meta_loss])
    ("l2b", "sum", "exact", True),
    ("l2b", "softmax", "exact", True),
    ("l2b", "softmax", "exact", True, "sum"),  # G summed over the GLOBAL clean batch, not each rank's share
    ("l2rw", "sum", "exact", True),
    ("l2b-convex", "sum", "exact", True),
    ("l2b", "sum", "exact", False),
    ("l2b", "sum", "fd", True),
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
    method_name, normalize, meta_grad, fuse, *meta_loss = case
    module = _net()
    model = wrap(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    method = create_method(method_name, normalize=normalize, meta_loss=(meta_loss or ["mean"])[0])
    weights = []
    for x, y, xv, yv in _batches():
        n, m = N // world, M // world
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        xv, yv = xv[rank * m : (rank + 1) * m], yv[rank * m : (rank + 1) * m]
        ctx = StepContext(opt, lambda: (xv, yv), 1, 4, module=module, world_size=world, meta_grad=meta_grad,
                          fuse_forward=fuse)
        result = method.step(model, x, y, ctx)
        opt.zero_grad()
        result.loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        opt.step()
        weights.append(torch.stack([result.alpha, result.beta]))
    return torch.cat(weights, dim=1), [p.detach().clone() for p in module.parameters()]


def _worker(rank, world, out_dir):
    # a file store, not a TCP port: no port to race for with other tests' process groups
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world)
    try:
        results = {case: _train(case, rank, world, nn.parallel.DistributedDataParallel) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case in CASES:
        single_w, single_p = _train(case)
        steps_w = single_w.view(2, STEPS, N)
        got_w = torch.cat([rk[case][0].view(2, STEPS, N // WORLD) for rk in ranks], dim=2)
        # exact: only summation order differs; fd: its step h ~ sqrt(eps) turns that rounding into a
        # relative error of eps / h = sqrt(eps) (about 1.5e-8 in float64) on each weight
        atol = 1e-10 if case[2] == "exact" else 10 * FD_RELATIVE_ERROR * float(steps_w.abs().max())
        assert torch.allclose(got_w, steps_w, rtol=0, atol=atol), (case, (got_w - steps_w).abs().max())
        for rk in ranks:  # every rank ends with the single process's parameters
            for a, b in zip(rk[case][1], single_p):
                assert torch.allclose(a, b, rtol=0, atol=max(atol, 1e-10)), case
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

    from l2b.data.benchmarks import DEBIAN_FASHION_MNIST, fashion_mnist_dirs

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


def _l2b(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    src = str(Path(l2b.__file__).parents[1])  # the launched ranks import this checkout
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "l2b", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_fmnist):
    """An uninterrupted 2-rank run with augmentation (per-rank random streams) and a checkpoint per epoch."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = _l2b("train", "--out", str(out), "--data-dir", str(tiny_fmnist), "--subset", "300", "--val-size", "100",
                "--batch-size", "32", "--val-batch-size", "20", "--epochs", "3", "--warmup-epochs", "1",
                "--eval-batch-size", "300", "--augment", "--keep-checkpoints", "4", "--nproc", "2",
                "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr
    return out


def test_ddp_per_sample_records_cover_every_rank(ddp_run):
    table = np.genfromtxt(ddp_run / "per_sample.csv", delimiter=",", names=True)
    n_train = len(table)
    steps = n_train // 32
    # 2 meta epochs after the 1-epoch warm-up, every full global batch recorded once per epoch
    assert table["meta_steps"].sum() == 2 * steps * 32
    assert (table["meta_steps"] > 0).mean() > 0.9  # not only rank 0's half
    recorded = table["meta_steps"] > 0
    assert np.allclose(table["alpha_mean"][recorded].mean() + table["beta_mean"][recorded].mean(), 1.0, atol=0.05)


def test_ddp_resume_from_an_epoch_checkpoint_is_bit_identical(ddp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    shutil.copyfile(run / "checkpoint-epoch0001.pt", run / "checkpoint.pt")  # as if stopped after epoch 1
    done = _l2b("train", "--resume", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    ref, got = safe_load(ddp_run / "checkpoint.pt"), safe_load(run / "checkpoint.pt")
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], got["model"][k]), k  # bit-identical, not merely close
    assert (run / "per_sample.csv").read_text() == (ddp_run / "per_sample.csv").read_text()
    assert len(got["ranks"]) == 2


def test_ddp_checkpoint_resumed_by_another_world_size_is_refused(ddp_run, tmp_path):
    from l2b.cli import main

    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("nproc: 2", "nproc: 1"))
    assert main(["train", "--resume", str(run), "--quiet"]) == 2  # one process, two ranks' states: one clear line


def test_ddp_sigint_stops_every_rank_at_one_step_and_resumes_bit_identically(ddp_run, tiny_fmnist, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    config = (ddp_run / "config.yaml").read_text()
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(Path(l2b.__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--data-dir", str(tiny_fmnist), "--subset", "300", "--val-size", "100", "--batch-size", "32",
            "--val-batch-size", "20", "--epochs", "3", "--warmup-epochs", "1", "--eval-batch-size", "300",
            "--augment", "--keep-checkpoints", "4", "--nproc", "2", "--device", "cpu", "--quiet"]
    assert "augment: true" in config  # the same run as the fixture's
    proc = subprocess.Popen([sys.executable, "-m", "l2b", "train", "--out", str(run), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not (run / "checkpoint.pt").exists():  # after epoch 1: two epochs are left to interrupt
        assert proc.poll() is None and time.time() - t0 < 240, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to the launcher, as Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("resume with: l2b train --resume") == 1 and "Traceback" not in err, err
    done = _l2b("train", "--resume", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    ref, got = safe_load(ddp_run / "checkpoint.pt")["model"], safe_load(run / "checkpoint.pt")["model"]
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
