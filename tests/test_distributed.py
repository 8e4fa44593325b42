"""Data parallelism on CPU with gloo: K ranks must match one process over the same global batch."""

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
from torch import nn

import l2b

pytestmark = pytest.mark.xdist_group("ddp")  # one worker runs this module's process groups, in turn
from l2b.train.checkpoint import safe_load
from l2b.parallel import average_tensors
from l2b.train.distributed import strip_nproc
from l2b.methods import StepContext, create_method
from helpers import same_model

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


def _env(*paths):
    # one thread per rank, as torchrun sets it for several ranks on one machine (and the launchers below
    # each start one): CPU kernels then sum in the same order in every run compared here
    src = str(Path(l2b.__file__).parents[1])  # the launched ranks import this checkout
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([*map(str, paths), src, os.environ.get("PYTHONPATH", "")]))


def _l2b(*args, paths=()):
    return subprocess.run([sys.executable, "-m", "l2b", *args], capture_output=True, text=True, env=_env(*paths),
                          timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(run):
    """metrics.jsonl without the wall-clock seconds (which no two runs share)."""
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_fmnist):
    """An uninterrupted 2-rank run with augmentation (per-rank random streams) and a checkpoint per epoch."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = _l2b("train", "--out", str(out), *_ddp_args(tiny_fmnist), "--nproc", "2")
    assert done.returncode == 0, done.stderr
    return out


def _ddp_args(data_dir):
    return ["--data-dir", str(data_dir), "--subset", "300", "--val-size", "100", "--batch-size", "32",
            "--val-batch-size", "20", "--epochs", "3", "--warmup-epochs", "1", "--eval-batch-size", "300", "--augment",
            "--keep-checkpoints", "4", "--device", "cpu", "--quiet"]


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


def test_ddp_checkpoint_resumed_by_another_world_size_is_refused(ddp_run, tmp_path, capsys):
    from l2b.cli import main

    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("nproc: 2", "nproc: 1"))
    before = (run / "checkpoint.pt").read_bytes()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2  # one process, two ranks' states: one clear line
    err = capsys.readouterr().err.strip()
    assert err.startswith("l2b: error: the checkpoint was written by 2 process(es), this run has 1") and "\n" not in err
    assert "--nproc 2" in err
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing overwritten


def test_sync_bn_off_the_gpu_is_one_line_before_any_process_group(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")  # as torchrun sets it
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = l2b.make_config({"sync_bn": True, "device": "cpu", "out": str(tmp_path / "run")})
    with pytest.raises(l2b.L2BError, match="--sync-bn needs CUDA devices") as info:
        l2b.train(cfg)
    assert "\n" not in str(info.value) and not dist.is_initialized() and not (tmp_path / "run").exists()


def test_ddp_sigterm_mid_epoch_with_augment_resumes_bit_identically(ddp_run, tiny_fmnist, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    assert "augment: true" in (ddp_run / "config.yaml").read_text()  # per-rank augmentation streams
    proc = subprocess.Popen([sys.executable, "-m", "l2b", "train", "--out", str(run), *_ddp_args(tiny_fmnist),
                             "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    t0 = time.time()
    # checkpoint.pt is written before the first step; epoch 1's own file says epoch 2's steps have begun
    while not (run / "checkpoint-epoch0001.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 240, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler's kill does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.count("resume with: l2b train --resume") == 1 and "Traceback" not in err, err
    stopped = safe_load(run / "checkpoint.pt")["position"]
    assert stopped["epoch"] == 1 and 0 < stopped["batch"] < 300 // 32, stopped  # mid-epoch, not at a boundary
    done = _l2b("train", "--resume", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    assert not same_model(ddp_run, run)  # bit-identical, not merely close
    assert (run / "per_sample.csv").read_text() == (ddp_run / "per_sample.csv").read_text()
    assert _metrics(run) == _metrics(ddp_run)


def test_two_torchrun_nodes_on_localhost_equal_the_one_machine_run(ddp_run, tiny_fmnist, tmp_path):
    """Two launchers, one rank each, as on two machines (static rendezvous at node 0's address)."""
    port = _free_port()
    outs = [tmp_path / "node0", tmp_path / "node1"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "--max-restarts", "0", "-m", "l2b", "train", "--out", str(outs[node]),
                               *_ddp_args(tiny_fmnist)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for node in (0, 1)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not outs[1].exists()  # only global rank 0 (node 0) writes
    assert "nproc: 2" in (outs[0] / "config.yaml").read_text()  # the world size, as --resume needs it
    assert (outs[0] / "per_sample.csv").read_text() == (ddp_run / "per_sample.csv").read_text()
    assert _metrics(outs[0]) == _metrics(ddp_run)
    assert not same_model(ddp_run, outs[0])


NO_BN_MODEL = """
import l2b
from torch import nn


@l2b.register_model("no-bn")
def no_bn(num_classes, in_channels=1, **_):
    # without BatchNorm no sample's output depends on the others of its shard
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 32), nn.Tanh(), nn.Linear(32, num_classes))
"""


def test_per_sample_records_of_two_ranks_equal_one_process(tiny_fmnist, tmp_path):
    (tmp_path / "no_bn_model.py").write_text(NO_BN_MODEL)
    args = ["--data-dir", str(tiny_fmnist), "--subset", "300", "--val-size", "100", "--batch-size", "32",
            "--val-batch-size", "20", "--epochs", "2", "--warmup-epochs", "0", "--eval-batch-size", "300",
            "--model", "no-bn", "--device", "cpu", "--quiet"]
    for name, nproc in (("one", "1"), ("two", "2")):
        done = _l2b("--plugin", "no_bn_model", "train", "--out", str(tmp_path / name), *args, "--nproc", nproc,
                    paths=[tmp_path])
        assert done.returncode == 0, done.stderr
    one = np.genfromtxt(tmp_path / "one" / "per_sample.csv", delimiter=",", names=True)
    two = np.genfromtxt(tmp_path / "two" / "per_sample.csv", delimiter=",", names=True)
    steps = 300 // 32  # --subset: training images
    assert one["meta_steps"].sum() == 2 * steps * 32  # every full global batch of both epochs
    for col in ("index", "given_label", "meta_steps", "last_pseudo"):
        assert np.array_equal(one[col], two[col]), col
    # the same computation summed in another order (the clean gradient over two shards): float32 rounding
    for col in ("alpha_mean", "beta_mean", "disagreement_rate", "last_prob"):
        assert np.allclose(one[col], two[col], rtol=1e-4, atol=1e-7, equal_nan=True), (col, np.nanmax(abs(one[col] - two[col])))
    assert np.nanmax(one["alpha_mean"]) > 0  # not a comparison of zeros
