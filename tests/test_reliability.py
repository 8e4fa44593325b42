import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2b import L2BError
from l2b.train.checkpoint import safe_load
from l2b.cli import main
from helpers import same_model, wait_for


def _l2b(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "l2b", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def _params(run: Path):
    return safe_load(run / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_fmnist):
    out = tmp_path_factory.mktemp("ref") / "run"
    args = ["--data-dir", str(tiny_fmnist), "--subset", "300", "--val-size", "100", "--batch-size", "32",
            "--val-batch-size", "20", "--epochs", "3", "--warmup-epochs", "1", "--eval-batch-size", "300", "--quiet"]
    proc = _l2b("train", "--out", str(out), *args)  # a fresh process, like the runs it is compared with
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out, args


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path, uninterrupted):
    ref, args = uninterrupted
    run = tmp_path / "run"
    proc = _l2b("train", "--out", str(run), *args)
    wait_for(run / "checkpoint.pt", proc)  # at least one checkpoint, then a random moment later
    time.sleep(random.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _l2b("train", "--resume", str(run))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert not same_model(run, ref)  # bit-identical, not merely close
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # no duplicated epoch lines after the resume


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_checkpoint_and_says_how_to_resume(tmp_path, uninterrupted, sig, code):
    ref, args = uninterrupted
    run = tmp_path / "run"
    proc = _l2b("train", "--out", str(run), *args)
    wait_for(run / "checkpoint.pt", proc)  # inside the loop: the handler is installed
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, err
    assert f"l2b train --resume {run}" in err and "Traceback" not in err
    resumed = _l2b("train", "--resume", str(run))
    resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    assert not same_model(run, ref)  # bit-identical, not merely close


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    with open(run / "checkpoint.pt", "wb") as fh:
        pickle.dump({"config": _Exploit(marker)}, fh)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l2b: error:") and "refused to load" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_nan_stops_with_advice_and_keeps_last_good_state(tmp_path, tiny_args, capsys, monkeypatch):
    from l2b.methods import reweight as _methods

    real_step, calls = _methods.CrossEntropy.step, []

    def step(self, model, x, y, ctx):  # a loss that turns NaN in the second epoch (9 steps each)
        out = real_step(self, model, x, y, ctx)
        calls.append(1)
        return out if len(calls) < 12 else _methods.StepResult(out.loss * float("nan"))

    monkeypatch.setattr(_methods.CrossEntropy, "step", step)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--method", "ce", *tiny_args]) == 2
    err = capsys.readouterr().err
    assert "loss became nan at epoch 2, step 11" in err and "--lr" in err and "--on-nan skip" in err
    state = safe_load(run / "checkpoint.pt")
    assert state["position"]["epoch"] == 1  # the end-of-epoch-1 state, untouched by the fault
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_skip_counts_and_finishes(tmp_path, tiny_args, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--lr", "1e8", "--grad-clip", "0", "--method", "ce",
                 "--on-nan", "skip", *tiny_args]) == 0
    import json

    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("skipped_steps", 0) for m in lines) > 0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from l2b.train.checkpoint import atomic_save

    target = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(3)}, target)

    def broken(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(L2BError, match=r"cannot write .*c\.pt \(disk full\); the previous c\.pt.* is intact"):
        atomic_save({"a": torch.zeros(3)}, target)
    assert torch.equal(safe_load(target)["a"], torch.ones(3))  # the old file survives whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_all_zero_meta_weights_are_counted_never_nan(tmp_path, tiny_args, monkeypatch):
    import json

    from l2b import meta as _meta

    monkeypatch.setattr(_meta, "normalize_weights", lambda a, b, **kw: (torch.zeros_like(a), torch.zeros_like(b)))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_args]) == 0
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert "zero_weight_batches" not in lines[0]  # warm-up epoch: plain CE
    assert [m["zero_weight_batches"] for m in lines[1:]] == [300 // 32] * 2  # every meta step counted
    assert all(m["train_loss"] == 0.0 for m in lines[1:])
