"""tools/select_by_val.py: a choice among candidate settings uses clean-validation accuracy only."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def select(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "select_by_val.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def run_folder(root, name, *, seed, val, test, finished=True, **config):
    """A run folder as the trainer writes it: config.yaml, metrics.jsonl (one record per epoch), summary.json."""
    path = root / name
    path.mkdir(parents=True)
    cfg = {"method": "bootstrap-soft", "noise": "sym", "noise_rate": 0.4, "epochs": len(val), "seed": seed,
           "bootstrap_beta": 0.95, "device": "cpu", "out": str(path), **config}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "val_acc": v, "test_acc": t}) + "\n"
                                                for e, (v, t) in enumerate(zip(val, test))))
    if finished:
        (path / "summary.json").write_text(json.dumps({"test_acc_best_val": max(test), "test_acc_max": max(test)}))
    return path


def test_the_candidate_with_the_higher_clean_val_mean_wins_whatever_the_test_accuracy(tmp_path):
    # beta 0.8 has the better clean-val accuracy on both seeds; beta 0.95 has far better test accuracy:
    # the choice must follow clean validation only
    for seed, (v95, v80) in enumerate([(70.0, 72.0), (71.0, 71.5)], start=1):
        run_folder(tmp_path, f"b95-s{seed}", seed=seed, bootstrap_beta=0.95, val=[60.0, v95, 65.0], test=[99, 99, 99])
        run_folder(tmp_path, f"b80-s{seed}", seed=seed, bootstrap_beta=0.8, val=[v80, 50.0, 55.0], test=[10, 10, 10])
    done = select("--key", "bootstrap_beta", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("chosen by clean-validation accuracy: bootstrap_beta=0.8")
    assert "| 0.8 | 1,2 | 71.75 | 0.35 | +0.00 ± 0.00 |" in done.stdout  # mean of the per-run maxima 72.0, 71.5
    # paired differences -2.0, -0.5: mean -1.25, half-width t(0.975, 1) * 1.0607 / sqrt(2) = 9.53
    assert "| 0.95 | 1,2 | 70.50 | 0.71 | -1.25 ± 9.53 |" in done.stdout
    assert "99" not in done.stdout  # no test accuracy anywhere in the output


def test_a_reference_is_kept_unless_the_leader_is_ahead_beyond_the_interval(tmp_path):
    close, clear = tmp_path / "close", tmp_path / "clear"
    for seed, (v95, v80) in enumerate([(70.0, 72.0), (71.0, 71.5), (71.5, 73.0)], start=1):  # +2.0, +0.5, +1.5
        run_folder(close, f"b95-s{seed}", seed=seed, val=[v95], test=[50.0])
        run_folder(close, f"b80-s{seed}", seed=seed, bootstrap_beta=0.8, val=[v80], test=[50.0])
    for seed, (v95, v80) in enumerate([(70.0, 72.0), (71.0, 72.8), (71.5, 73.7)], start=1):  # +2.0, +1.8, +2.2
        run_folder(clear, f"b95-s{seed}", seed=seed, val=[v95], test=[50.0])
        run_folder(clear, f"b80-s{seed}", seed=seed, bootstrap_beta=0.8, val=[v80], test=[50.0])
    kept = select("--key", "bootstrap_beta", "--reference", "0.95", close)
    assert kept.returncode == 0, kept.stderr
    assert "| 0.8 | 1,2,3 | 72.17 | 0.76 | +1.33 ± 1.90 |" in kept.stdout  # t(0.975, 2) = 4.303
    assert "the reference is kept" in kept.stdout and kept.stdout.strip().endswith("bootstrap_beta=0.95")
    assert select("--key", "bootstrap_beta", close).stdout.strip().endswith("bootstrap_beta=0.8")  # no reference
    taken = select("--key", "bootstrap_beta", "--reference", "0.95", clear)
    assert "+2.00 ± 0.50 |" in taken.stdout and taken.stdout.strip().endswith("bootstrap_beta=0.8")
    tie = tmp_path / "tie"
    for beta in (0.95, 0.8):
        run_folder(tie, f"b{beta}", seed=1, bootstrap_beta=beta, val=[70.0], test=[50.0])
    assert select("--key", "bootstrap_beta", "--reference", "0.95", tie).stdout.strip().endswith("bootstrap_beta=0.95")
    missing = select("--key", "bootstrap_beta", "--reference", "0.5", tie)
    assert missing.returncode == 2 and "no such candidate" in missing.stderr


def test_t_quantiles_match_the_tables():
    spec = importlib.util.spec_from_file_location("select_by_val", ROOT / "tools" / "select_by_val.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert abs(tool.t_quantile(0.975, df) - want) < 1e-3, df


def test_comparisons_that_are_not_paired_or_not_like_with_like_are_refused(tmp_path):
    a, b, c, d = (tmp_path / s for s in "abcd")
    run_folder(a, "b95-s1", seed=1, val=[70.0], test=[70.0])
    run_folder(a, "b80-s2", seed=2, bootstrap_beta=0.8, val=[70.0], test=[70.0])
    run_folder(b, "b95-s1", seed=1, val=[70.0], test=[70.0])
    run_folder(b, "b80-s1", seed=1, bootstrap_beta=0.8, lr=0.1, val=[70.0], test=[70.0])
    run_folder(c, "b95-s1", seed=1, val=[70.0], test=[70.0])
    run_folder(c, "b80-s1", seed=1, bootstrap_beta=0.8, val=[70.0], test=[70.0], finished=False)
    run_folder(d, "b95-s1", seed=1, val=[70.0], test=[70.0])
    run_folder(d, "b80-s1", seed=1, bootstrap_beta=0.8, device="cuda", val=[72.0], test=[70.0])
    for root, why in ((a, "must be paired"), (b, "differ in 'lr'"), (c, "has not finished")):
        done = select("--key", "bootstrap_beta", root)
        assert done.returncode == 2 and done.stderr.startswith("select_by_val: error: ") and why in done.stderr, \
            done.stderr
        assert done.stdout == ""
    # where a run went (device, output folder) is not part of the recipe
    assert select("--key", "bootstrap_beta", d).stdout.strip().endswith("bootstrap_beta=0.8")


def test_a_clean_batch_of_zero_is_the_batch_size_and_compares_as_it(tmp_path):
    # the recipe study's first runs wrote the clean batch as a number, its configs as 0 (= the batch size)
    l2b = dict(method="l2b", batch_size=128)
    run_folder(tmp_path, "lr05-s1", seed=1, lr=0.05, val_batch_size=128, val=[70.0], test=[70.0], **l2b)
    run_folder(tmp_path, "lr15-s1", seed=1, lr=0.15, val_batch_size=0, val=[72.0], test=[60.0], **l2b)
    assert select("--key", "lr", tmp_path).stdout.strip().endswith("lr=0.15")
    run_folder(tmp_path / "other", "lr15-s1", seed=1, lr=0.15, val_batch_size=0, val=[72.0], test=[60.0],
               **{**l2b, "batch_size": 64})  # 0 with another batch size is another clean batch
    done = select("--key", "lr", tmp_path / "lr05-s1", tmp_path / "other")
    assert done.returncode == 2 and "differ in 'batch_size'" in done.stderr, done.stderr


def test_the_clean_batch_size_is_no_setting_of_a_method_that_never_draws_one(tmp_path):
    # bootstrapping never draws a clean batch (tests/test_baselines.py: its model does not depend on the
    # size), so runs made under two clean-batch defaults compare; L2B's do not
    for method, key, values, ok in (("bootstrap-soft", "bootstrap_beta", (0.95, 0.8), True),
                                    ("l2b", "lr", (0.05, 0.15), False)):
        root = tmp_path / method
        for value, m in zip(values, (100, 128)):
            run_folder(root, f"{value}-s1", seed=1, method=method, val_batch_size=m, val=[70.0], test=[70.0],
                       **{key: value})
        done = select("--key", key, root)
        assert (done.returncode == 0) == ok, done.stderr
        assert ok or "differ in 'val_batch_size'" in done.stderr
