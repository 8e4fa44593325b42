"""Faults: kill -9 at random moments (also before the first epoch ends), a full disk (injected ENOSPC),
two writers on one run folder, SIGTERM to a sweep, damaged checkpoints, outputs that exist already,
and a reader that leaves the pipe. Every case goes through the ledger's contract check."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from l2b.train.checkpoint import digest, load_checkpoint
from helpers import same_model, wait_for

pytestmark = pytest.mark.xdist_group("fuzz")


def _l2b(*args):
    return subprocess.Popen([sys.executable, "-m", "l2b", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_fmnist):
    """A finished 2-epoch run (reference for resumes and source of checkpoints to damage), and its options."""
    args = ["--data-dir", str(tiny_fmnist), "--subset", "160", "--val-size", "60", "--batch-size", "16",
            "--val-batch-size", "20", "--epochs", "2", "--warmup-epochs", "1", "--eval-batch-size", "300", "--quiet"]
    ref = tmp_path_factory.mktemp("ref") / "run"
    proc = _l2b("train", "--out", str(ref), *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return ref, args


def test_kill_9_before_the_first_epoch_ends_then_resume_is_bit_identical(ledger, tmp_path, small):
    ref, args = small
    run = tmp_path / "run"
    proc = _l2b("train", "--out", str(run), "--checkpoint-every", "3steps", *args)
    wait_for(run / "checkpoint.pt", proc)  # the checkpoint written before the first step
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    ledger.check(["train", "--resume", str(run)], expect="ok", oracle=lambda _: None if not same_model(run, ref)
                 else f"resumed model differs from the uninterrupted one (killed after {len(lines)} epochs)",
                 label="kill -9 early, resume")


def test_resume_of_a_folder_without_checkpoint_starts_it_from_its_config(ledger, tmp_path, small):
    ref, args = small
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ref / "config.yaml", run / "config.yaml")  # as a run killed before its first checkpoint leaves it
    cfg = (run / "config.yaml").read_text().replace(f"out: {ref}", f"out: {run}")
    (run / "config.yaml").write_text(cfg)
    ledger.check(["train", "--resume", str(run)], expect="ok",
                 oracle=lambda _: None if not same_model(run, ref) else "differs from the run it restarts",
                 label="resume without checkpoint")


def _damage(kind: str, src: Path, dst: Path) -> None:
    """A copy of run folder ``src`` at ``dst`` whose checkpoint is damaged by ``kind``."""
    shutil.copytree(src, dst)
    path = dst / "checkpoint.pt"
    raw = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 3])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "pickle_opcodes":  # a legacy-format pickle whose first opcode pops an empty stack (IndexError)
        path.write_bytes(b"\x80\x02.")  # protocol 2, then STOP on an empty stack
    elif kind == "bit_flip":
        b = bytearray(raw)
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))
    elif kind == "missing":
        path.unlink()
        (dst / "config.yaml").unlink()
    else:
        saved = torch.load(path, weights_only=True)
        if kind == "weights_altered":  # checksum left as it was
            name = next(iter(saved["model"]))
            saved["model"][name] = saved["model"][name] + 1e-3
        else:
            if kind == "key_dropped":
                del saved["optimizer"]
            elif kind == "wrong_type":
                saved["position"] = [1, 2, 3]
            elif kind == "bad_position":
                saved["position"]["epoch"] = -5
            elif kind == "foreign_position":
                saved["position"]["banana"] = 1
            elif kind == "model_mismatch":
                saved["model"] = {"conv.weight": torch.zeros(2)}
            elif kind == "not_a_dict":
                saved = [1, 2, 3]
            elif kind == "future_version":
                saved["format_version"] = 99
            elif kind == "bad_ranks":
                saved["ranks"] = [{"rng": 1}]
            if isinstance(saved, dict) and kind != "future_version":  # a consistent checksum: only the content is wrong
                body = {k: v for k, v in saved.items() if k != "checksum"}
                saved["checksum"] = digest(body)
        torch.save(saved, path)


DAMAGE = ("truncated", "empty", "garbage", "pickle_opcodes", "bit_flip", "missing", "weights_altered", "key_dropped", "wrong_type",
          "bad_position", "foreign_position", "model_mismatch", "not_a_dict", "future_version", "bad_ranks")


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_one_line(ledger, tmp_path, small, kind):
    ref, _ = small
    run = tmp_path / "run"
    _damage(kind, ref, run)
    ledger.check(["train", "--resume", str(run)], inputs=[run], expect="error", label=f"checkpoint {kind}")


def test_changed_data_is_refused_unless_resume_anyway(ledger, tmp_path, small):
    ref, _ = small
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    saved["position"]["epoch"], saved["position"]["metrics"] = 1, saved["position"]["metrics"][:1]
    saved["fingerprint"] = "0" * 64  # as if trained on other data or other noisy labels
    saved["checksum"] = digest({k: v for k, v in saved.items() if k != "checksum"})
    torch.save(saved, run / "checkpoint.pt")
    ledger.check(["train", "--resume", str(run)], inputs=[run], expect="error", label="data changed")
    ledger.check(["train", "--resume", str(run), "--resume-anyway"], expect="ok",
                 oracle=lambda _: None if (run / "summary.json").is_file() else "no summary",
                 label="data changed, --resume-anyway")


def test_disk_full_at_start_mid_run_and_in_history(ledger, tmp_path, tiny_args, monkeypatch):
    real_save, real_copy = torch.save, shutil.copyfileobj
    calls = {"n": 0}

    def full_after(k):
        def save(obj, fh, *a, **kw):
            calls["n"] += 1
            if calls["n"] > k:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, fh, *a, **kw)
        return save

    # at start: the first checkpoint cannot be written -> one line, and no run folder left
    monkeypatch.setattr(torch, "save", full_after(0))
    ledger.check(["train", "--out", str(tmp_path / "a"), *tiny_args], expect="error", outputs=[tmp_path / "a"],
                 label="ENOSPC at start")
    # mid-run: the 3rd save fails; the last good checkpoint stays whole and resumes
    calls["n"] = 0
    monkeypatch.setattr(torch, "save", full_after(2))
    ledger.check(["train", "--out", str(tmp_path / "b"), *tiny_args], expect="error", label="ENOSPC mid-run")
    assert not list((tmp_path / "b").glob("*.tmp")) and not list((tmp_path / "b").glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    load_checkpoint(tmp_path / "b" / "checkpoint.pt")  # verifies its checksum
    ledger.check(["train", "--resume", str(tmp_path / "b")], expect="ok", label="resume after ENOSPC",
                 oracle=lambda _: None if (tmp_path / "b" / "summary.json").is_file() else "no summary")
    # while copying checkpoint history: no torn checkpoint-epoch*.pt

    def copy_full(src, dst, *a):
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", copy_full)
    ledger.check(["train", "--out", str(tmp_path / "c"), "--keep-checkpoints", "2", *tiny_args], expect="error",
                 label="ENOSPC in history")
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert not list((tmp_path / "c").glob("checkpoint-epoch*.pt"))
    load_checkpoint(tmp_path / "c" / "checkpoint.pt")


def test_two_writers_on_one_run_folder(ledger, tmp_path, small):
    from l2b.train.outputs import lock_run_dir

    ref, _ = small
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    held = lock_run_dir(run)  # another process training in it (flock: per open file, so this conflicts too)
    try:
        ledger.check(["train", "--resume", str(run)], inputs=[run], expect="error", label="second writer")
    finally:
        held.close()
    ledger.check(["train", "--resume", str(run)], expect="ok", label="writer after the first let go",
                 oracle=lambda _: None if (run / "summary.json").is_file() else "no summary")


def test_failed_start_leaves_nothing_behind(ledger, tmp_path, tiny_args, tiny_fmnist):
    out = tmp_path / "run"
    for argv, label in (
        (["train", "--out", str(out), "--model", "resnet-9000", *tiny_args], "bad model"),
        (["train", "--out", str(out), "--lr", "nan", *tiny_args], "NaN lr"),
        (["train", "--out", str(out), *tiny_args, "--subset", "100000"], "subset too large (after reading data)"),
        (["train", "--out", str(out), *tiny_args, "--dataset", f"npz:{tmp_path / 'none.npz'}"], "no data"),
    ):
        ledger.check(argv, expect="error", outputs=[out], label=label)
    out.mkdir()  # an empty folder the user made is used, and kept on failure
    ledger.check(["train", "--out", str(out), *tiny_args, "--subset", "100000"], expect="error", label="empty out")
    assert out.is_dir() and not [p for p in out.iterdir() if p.name != ".lock"]


def test_sigterm_stops_a_sweep_and_a_rerun_resumes_it(ledger, tmp_path, small):
    _, args = small
    out = tmp_path / "sweep"
    sweep = ["sweep", "--out", str(out), "--seeds", "1,2", "--checkpoint-every", "2steps", *args]
    proc = _l2b(*sweep)
    first = out / "l2b-sym-r0.4-s1"
    wait_for(first / "checkpoint.pt", proc)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the signal arrived")
    assert proc.returncode == 143, err
    assert "Traceback" not in err and not (out / "l2b-sym-r0.4-s2").exists()  # the sweep stopped
    assert not (first / "error.txt").exists()

    def oracle(stdout):
        ok = "resumed" in stdout and all((out / c / "summary.json").is_file()
                                         for c in ("l2b-sym-r0.4-s1", "l2b-sym-r0.4-s2"))
        return None if ok else f"not resumed: {stdout}"

    ledger.check(sweep, expect="ok", oracle=oracle, label="sweep rerun")


def test_outputs_are_never_clobbered(ledger, tmp_path, small):
    ref, _ = small
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "new.npz", x=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), y=np.arange(5))
    target = tmp_path / "mine.csv"
    target.write_text("precious\n")
    base = ["--checkpoint", str(run), "--data", f"npz:{tmp_path / 'new.npz'}"]
    ledger.check(["predict", *base, "--out", str(target)], inputs=[target], expect="error", label="predict over a file")
    for name in ("predictions.csv", "predictions-2.csv"):  # the default name is numbered, never reused
        ledger.check(["predict", *base], expect="ok", label="predict twice",
                     oracle=lambda _, n=name: None if (run / n).read_text().count("\n") == 6 else f"no {n}")
    mine = tmp_path / "eval.json"
    mine.write_text("{}")
    ledger.check(["eval", *base, "--out", str(mine)], inputs=[mine], expect="error", label="eval over a file")
    (run / "label_issues.csv").write_text("precious\n")
    # a second `l2b labels` keeps the first table (someone may be working through it) and numbers its own
    ledger.check(["labels", str(run)], inputs=[run / "label_issues.csv"], expect="ok", label="labels twice",
                 oracle=lambda _: None if (run / "label_issues-2.csv").is_file() else "no label_issues-2.csv")
    ledger.check(["report", str(run), "--no-plots"], expect="ok", label="report",
                 oracle=lambda _: None if (run / "report" / "report.md").is_file() else "no report")
    ledger.check(["report", str(run), "--no-plots"], inputs=[run / "report"], expect="error", label="report twice")


def test_output_piped_into_head_exits_quietly(tmp_path, small):
    ref, _ = small
    proc = subprocess.run(f"{sys.executable} -m l2b report {ref} --out {tmp_path / 'r'} --no-plots | head -c 1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stderr == "", proc.stderr


def test_checkpoint_records_format_checksum_and_fingerprint(small):
    ref, _ = small
    saved = load_checkpoint(ref / "checkpoint.pt")
    assert saved["format_version"] == 2 and len(saved["fingerprint"]) == 64
    assert saved["checksum"] == digest({k: v for k, v in saved.items() if k != "checksum"})
    assert json.loads((ref / "summary.json").read_text())["epochs"] == 2


def test_a_stale_sweep_cell_names_no_missing_error_txt(ledger, tmp_path, small):
    _, args = small
    out = tmp_path / "sweep"
    (out / "l2b-sym-r0.4-s1").mkdir(parents=True)
    (out / "l2b-sym-r0.4-s1" / "notes.txt").write_text("mine")  # not a run folder of this sweep
    from l2b.cli import main
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["sweep", "--out", str(out), "--seeds", "1", *args]) == 1
    assert "stale" in text.getvalue() and "error.txt" not in text.getvalue()
    assert (out / "l2b-sym-r0.4-s1" / "notes.txt").read_text() == "mine"
