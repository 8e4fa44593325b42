"""Every method trains from the CLI; `l2b sweep` runs and resumes a grid; `l2b report` tables match the runs."""

import csv
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from l2b.apps import sweep as sweep_app
from l2b.registry import DATASETS
from l2b.data.benchmarks import load_fashion_mnist
from l2b import L2BError
from l2b import list_methods
from l2b.cli import main

SMALL = ["--subset", "200", "--val-size", "100", "--batch-size", "50", "--val-batch-size", "50",
         "--stage1-epochs", "1", "--quiet"]
TINY = [*SMALL, "--epochs", "1"]


@pytest.fixture(scope="module")
def small_test_set():
    """Fashion-MNIST with its test set cut to 300 images, so that evaluation does not dominate tiny runs."""
    try:
        data = load_fashion_mnist(download=False)
    except L2BError as exc:
        pytest.skip(str(exc))
    data.x_test, data.y_test = data.x_test[:300], data.y_test[:300]
    return data


@pytest.fixture
def fmnist_cut_test(small_test_set, monkeypatch):
    monkeypatch.setitem(DATASETS, "fashion-mnist", lambda cfg: small_test_set)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_from_the_cli(method, fmnist_cut_test, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--warmup-epochs", "0", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and 0 <= summary["test_acc_last"] <= 100
    assert "test accuracy, last epoch" in capsys.readouterr().out


def _summaries(root):
    return {p.parent.name: json.loads(p.read_text()) for p in Path(root).rglob("summary.json")}


def test_sweep_is_resumable_and_report_matches_the_summaries(fmnist_cut_test, tmp_path, capsys, monkeypatch):
    sweep = ["sweep", "--methods", "ce,l2b", "--noise-rates", "0.4", "--seeds", "1,2", "--epochs", "2",
             "--warmup-epochs", "1", *SMALL]
    assert main([*sweep, "--out", str(tmp_path / "a")]) == 0
    names = {"ce-sym-r0.4-s1", "ce-sym-r0.4-s2", "l2b-sym-r0.4-s1", "l2b-sym-r0.4-s2"}
    assert set(_summaries(tmp_path / "a")) == names

    # resumable: finished runs are skipped; a broken cell is reported and the others continue
    calls = []
    real_train = sweep_app.train
    monkeypatch.setattr(sweep_app, "train", lambda cfg, **kw: calls.append(cfg) or real_train(cfg, **kw))
    (tmp_path / "a" / "mixup-sym-r0.4-s1").mkdir()  # a stale folder: no summary, checkpoint or config
    (tmp_path / "a" / "mixup-sym-r0.4-s1" / "notes.txt").write_text("not a run")  # (an empty one would be used)
    capsys.readouterr()
    assert main([*sweep, "--methods", "ce,mixup,l2b", "--out", str(tmp_path / "a")]) == 1
    printed = capsys.readouterr().out
    assert "stale" in printed and printed.count("skipped") == 4
    assert [c.method for c in calls] == ["mixup"]  # only the cell that was neither finished nor stale ran
    monkeypatch.setattr(sweep_app, "train", real_train)

    # normalisations compared (Fig. 3) needs runs that differ in `normalize`
    assert main(["sweep", "--methods", "l2b", "--noise-rates", "0.4", "--seeds", "1", "--normalize", "softmax",
                 "--epochs", "2", "--warmup-epochs", "1", *SMALL,
                 "--out", str(tmp_path / "b")]) == 0
    report = tmp_path / "report"
    try:
        import matplotlib  # noqa: F401
        plots = ("fig2_test_acc.png", "fig3_normalize.png", "fig4_weights.png", "fig4_auroc.png", "table9_time.png")
    except ImportError:  # the tables do not need it
        plots = ()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(report),
                 *([] if plots else ["--no-plots"])]) == 0
    for name in ("report.md", "results.csv", *plots):
        assert (report / name).stat().st_size > 0, name

    rows = {r["method"]: r for r in csv.DictReader(open(report / "results.csv"))}
    summaries = _summaries(tmp_path / "a")
    ce = [summaries[f"ce-sym-r0.4-s{s}"] for s in (1, 2)]
    for key, col in (("test_acc_last", "last"), ("test_acc_best_val", "best-val"), ("test_acc_max", "max-test")):
        vals = [s[key] for s in ce]
        assert float(rows["ce"][f"{col}_mean"]) == pytest.approx(sum(vals) / 2)
        assert float(rows["ce"][f"{col}_std"]) == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert {"l2b [normalize=sum]", "l2b [normalize=softmax]"} <= set(rows)
    softmax_run = _summaries(tmp_path / "b")["l2b-sym-r0.4-s1"]
    assert float(rows["l2b [normalize=softmax]"]["last_mean"]) == pytest.approx(softmax_run["test_acc_last"])
    md = (report / "report.md").read_text()
    assert "max-test" in md and "TEST set" in md


def _fake_run(root, name, method, rate, seed, accs, normalize="sum", seconds=1.0):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"method": method, "noise_rate": rate, "seed": seed,
                                                   "normalize": normalize, "dataset": "toy", "noise": "sym"}))
    metrics = [{"epoch": e + 1, "val_acc": a, "test_acc": a, "seconds": seconds,
                "alpha_clean": 1.2, "alpha_flipped": 0.5, "beta_clean": 0.1, "beta_flipped": 0.3} for e, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "summary.json").write_text(json.dumps({
        "method": method, "dataset": "toy", "noise": "sym", "noise_rate": rate, "seed": seed, "epochs": len(accs),
        "test_acc_last": accs[-1], "test_acc_best_val": max(accs), "test_acc_max": max(accs) + 1}))


def test_report_on_synthetic_runs_reads_only_run_folders(tmp_path):
    for seed, accs in ((1, [50.0, 60.0]), (2, [55.0, 70.0]), (3, [52.0, 80.0])):
        _fake_run(tmp_path / "runs", f"ce-{seed}", "ce", 0.4, seed, accs)
    _fake_run(tmp_path / "runs", "l2b-1", "l2b", 0.2, 1, [40.0, 45.0], seconds=3.0)
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "config.yaml").write_text("method: ce\n")  # unfinished: left out
    code = (f"import sys; from l2b.apps.report import write_report; r = write_report([{str(tmp_path / 'runs')!r}], "
            f"{str(tmp_path / 'out')!r}, plots=False); "
            "print(r['runs'])")  # that the report module never imports the trainer: tests/test_layers.py
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
    rows = {(r["method"], float(r["noise_rate"])): r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    ce = rows["ce", 0.4]
    assert float(ce["last_mean"]) == pytest.approx(70.0) and float(ce["last_std"]) == pytest.approx(10.0)
    assert float(ce["max-test_mean"]) == pytest.approx(71.0)
    assert ce["seeds"] == "1 2 3" and ce["runs"] == "3"
    assert rows["l2b", 0.2]["last_std"] == "" and float(rows["l2b", 0.2]["seconds_per_epoch"]) == 3.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| ce | — | 70.00 ± 10.00 |" in md  # method x noise rate, a missing cell shown as a dash


def test_report_reads_a_key_missing_from_older_run_folders_as_its_default(tmp_path):
    from l2b.apps.report import aggregate, load_runs

    _fake_run(tmp_path, "old", "l2b", 0.4, 1, [60.0])  # written before `meta_set` existed
    _fake_run(tmp_path, "new", "l2b", 0.4, 2, [62.0])
    _fake_run(tmp_path, "pseudo", "l2b", 0.4, 3, [50.0])
    for name, meta_set in (("new", "clean"), ("pseudo", "pseudo")):
        cfg = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({**cfg, "meta_set": meta_set}))
    rows = {r["method"]: r for r in aggregate(load_runs([tmp_path]))}
    assert set(rows) == {"l2b [meta_set=clean]", "l2b [meta_set=pseudo]"}
    assert rows["l2b [meta_set=clean]"]["seeds"] == "1 2"  # the old folder joins the default's cell


def test_report_splits_the_weights_by_sample_group(tmp_path):
    # two runs of one cell: the groups' shares and mean weights are each run's, averaged over the runs
    from l2b.apps.report import write_report

    header = "index,given_label,true_label,alpha_mean,beta_mean,pred_label\n"
    samples = {1: ["0,1,1,0.5,0.4,1", "1,1,1,0.7,0.6,1", "2,2,2,0.9,0.8,0", "3,0,2,0.1,1.0,2"],
               2: ["0,1,1,0.3,0.2,1", "1,2,2,1.1,0.0,0", "2,0,2,0.2,0.9,0", "3,0,2,0.4,0.5,1"]}
    for seed, rows in samples.items():
        _fake_run(tmp_path, f"l2b-{seed}", "l2b", 0.5, seed, [50.0])
        text = header + "\n".join(rows) + "\n"
        if seed == 1:
            (tmp_path / "l2b-1" / "per_sample.csv").write_text(text)
        else:  # as committed under docs/results: compressed
            (tmp_path / "l2b-2" / "per_sample.csv.gz").write_bytes(gzip.compress(text.encode()))
    _fake_run(tmp_path, "ce-1", "ce", 0.5, 1, [40.0])  # no per_sample.csv: not in the groups
    result = write_report([tmp_path], tmp_path / "report", plots=False)
    with open(tmp_path / "report" / "sample_groups.csv", newline="") as fh:
        got = {r["group"]: r for r in csv.DictReader(fh)}
    assert {r["method"] for r in got.values()} == {"l2b"} and {r["runs"] for r in got.values()} == {"2"}
    right, wrong = got["clean, predicted right"], got["clean, predicted wrong"]
    assert float(right["share_pct"]) == pytest.approx((50 + 25) / 2)
    assert float(right["alpha"]) == pytest.approx((0.6 + 0.3) / 2) and float(right["beta"]) == pytest.approx((0.5 + 0.2) / 2)
    assert float(wrong["alpha"]) == pytest.approx((0.9 + 1.1) / 2)
    assert float(got["flipped, predicted the true class"]["share_pct"]) == pytest.approx((25 + 0) / 2)
    assert float(got["flipped, predicted the given label"]["beta"]) == pytest.approx(0.9)  # seed 2 alone has one
    assert float(got["flipped, predicted a third class"]["alpha"]) == pytest.approx(0.4)
    assert sum(float(r["share_pct"]) for r in got.values()) == pytest.approx(100)
    assert "Where the weights go" in (tmp_path / "report" / "report.md").read_text()
    assert any(str(f).endswith("sample_groups.csv") for f in result["files"])

    (tmp_path / "l2b-1" / "per_sample.csv").write_text("index,given_label,true_label,alpha_mean,beta_mean\n0,1,1,0.5,0.4\n")
    with pytest.raises(L2BError, match="no column pred_label"):
        write_report([tmp_path], tmp_path / "report", plots=False)
