"""Your own data end to end: its defaults, its trusted set, evaluation, and the sklearn estimator.

Tiny generated data sets (a few dozen 8x8 images, 3 classes told apart by a bright band), 1-2 epochs.
"""

import json

import numpy as np
import pytest
import yaml

from l2b import L2BError, cli, make_config
from l2b.config import Config
from l2b.data.benchmarks import BENCHMARK_PRESET
from helpers import bands

CLASSES = ["low", "mid", "high"]
FAST = ["--epochs", "2", "--batch-size", "16", "--val-batch-size", "9", "--device", "cpu", "--quiet"]


@pytest.fixture
def npz(tmp_path):
    """npz:d.npz without a val split, a trusted set in trusted.npz, and the same data with x_val."""
    (x, y), (xv, yv), (xt, yt) = bands(60, 0), bands(18, 1), bands(15, 2)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    np.savez(tmp_path / "trusted.npz", x=xv, y=yv)
    np.savez(tmp_path / "dv.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, x_val=xv, y_val=yv,
             classes=np.array(CLASSES))
    return tmp_path


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("l2b: error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- 1. defaults per data source

def test_user_data_defaults_and_benchmark_presets():
    user = make_config({"dataset": "npz:any.npz"})
    assert (user.noise, user.noise_rate, user.subset, user.val_size, user.test_every) == ("none", None, None, 0, 0)
    for name in ("fashion-mnist", "cifar10", "cifar100", "isic2019"):
        cfg = make_config({"dataset": name})
        assert {k: getattr(cfg, k) for k in BENCHMARK_PRESET} == BENCHMARK_PRESET
    assert make_config({}).to_dict() == make_config({"dataset": "fashion-mnist"}).to_dict()
    # the preset's rate goes with the preset's noise: labels as given on a benchmark carry no rate
    assert make_config({"noise": "none"}).noise_rate is None
    assert Config().noise == "none" and make_config({"dataset": "clothing1m"}).subset is None


@pytest.mark.parametrize("values, message", [
    ({"dataset": "npz:x.npz", "noise": "sym"}, "give its rate"),
    ({"dataset": "npz:x.npz", "noise_rate": 0.3}, "injects nothing"),
    ({"trusted": "parquet:x"}, "trusted must be KIND:PATH"),
    ({"trusted": "npz:"}, "trusted must be KIND:PATH"),
])
def test_bad_noise_and_trusted_settings(values, message):
    with pytest.raises(L2BError, match=message):
        make_config(values)


def test_plan_and_no_noise_rate_for_labels_as_given(npz, capsys):
    out = npz / "run"
    assert cli.main(["train", "--dataset", f"npz:{npz / 'd.npz'}", "--trusted", f"npz:{npz / 'trusted.npz'}",
                     *FAST[:-1], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train 60, trusted 18, test 15" in printed and f"--trusted npz:{npz / 'trusted.npz'}" in printed
    assert "the labels as given, no synthetic noise" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["noise_rate"] is None
    summary = json.loads((out / "summary.json").read_text())
    noise = json.loads((out / "noise.json").read_text())
    assert summary["noise_rate"] is None and summary["noise_rate_actual"] is None and noise["noise_rate"] is None
    assert not (out / "true_labels.npy").exists()  # the user's labels are not the truth
    # the test set is scored at the end only: the last epoch, and best.pt where its epoch had no test pass
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_acc"] is None for m in metrics] == [True, False]
    assert summary["test_acc_max"] is None and summary["test_acc_last"] == metrics[-1]["test_acc"]
    # l2b eval on the same split, from the run folder (last model) and from best.pt, gives the same numbers
    for ckpt, key in ((out, "test_acc_last"), (out / "best.pt", "test_acc_best_val")):
        assert cli.main(["eval", "--checkpoint", str(ckpt)]) == 0
        assert str(ckpt.name if ckpt.suffix else out / "checkpoint.pt") in capsys.readouterr().out
        report = json.loads(sorted(out.glob("eval*.json"))[-1].read_text())
        assert 100 * report["accuracy"] == pytest.approx(summary[key]) and report["num_samples"] == 15


def test_test_every_records_a_curve(npz):
    out = npz / "run"
    assert cli.main(["train", "--dataset", f"npz:{npz / 'dv.npz'}", "--test-every", "1", *FAST,
                     "--out", str(out)]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert all(m["test_acc"] is not None for m in metrics)
    assert summary["test_acc_max"] == max(m["test_acc"] for m in metrics)


# ---------------------------------------------------------------- 2. the trusted set is never invented

def test_meta_method_without_trusted_set_names_the_three_ways_out(npz, capsys):
    data = f"npz:{npz / 'd.npz'}"
    assert cli.main(["train", "--dataset", data, *FAST, "--out", str(npz / "a")]) == 2
    err = _one_error(capsys)
    assert "--trusted" in err and "--meta-set pseudo" in err and "--method ce" in err
    assert cli.main(["train", "--dataset", data, "--val-size", "9", *FAST, "--out", str(npz / "b")]) == 2
    assert "not known to be clean" in _one_error(capsys)
    assert cli.main(["train", "--dataset", data, "--method", "ce", *FAST, "--out", str(npz / "c")]) == 0
    assert cli.main(["train", "--dataset", data, "--meta-set", "pseudo", "--pseudo-size", "9", *FAST,
                     "--out", str(npz / "d")]) == 0
    assert json.loads((npz / "c" / "noise.json").read_text())["num_clean"] == 0


def test_synthetic_noise_on_user_data_may_carve_from_the_labels_before_noise(npz):
    cfg_args = ["data", "check", "--dataset", f"npz:{npz / 'd.npz'}", "--noise", "sym", "--noise-rate", "0.2",
                "--val-size", "9", "--json"]
    assert cli.main(cfg_args) == 0


@pytest.mark.parametrize("trusted, message", [
    ("npz:{d}/d.npz", "no array named 'x_val'"),  # a training file without a val split
    ("npz:{d}/nolabels.npz", "no labels found"),
    ("npz:{d}/missing.npz", "does not exist"),
])
def test_bad_trusted_set(npz, capsys, trusted, message):
    np.savez(npz / "nolabels.npz", x=bands(6, 3)[0])
    assert cli.main(["data", "check", "--dataset", f"npz:{npz / 'd.npz'}",
                     "--trusted", trusted.format(d=npz)]) == 2
    assert message in _one_error(capsys)


def test_trusted_set_as_well_as_a_val_split_is_refused(npz, capsys):
    assert cli.main(["data", "check", "--dataset", f"npz:{npz / 'dv.npz'}",
                     "--trusted", f"npz:{npz / 'trusted.npz'}"]) == 2
    assert "already brings a trusted (val) split" in _one_error(capsys)


# ---------------------------------------------------------------- 3. evaluation

@pytest.fixture
def run(npz):
    out = npz / "run"
    assert cli.main(["train", "--dataset", f"npz:{npz / 'dv.npz'}", "--method", "ce", *FAST,
                     "--out", str(out)]) == 0
    return out


def _write_pngs(root, x, y):
    Image = pytest.importorskip("PIL.Image")
    files = []
    for i in range(len(y)):
        path = root / CLASSES[y[i]] / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(path)
        files.append(path)
    return files


def test_eval_scores_the_test_split_only(run, npz, capsys):
    (x, y), (xt, yt) = bands(30, 5), bands(12, 6)
    root = npz / "layout"
    _write_pngs(root / "train", x, y)
    test_files = _write_pngs(root / "test", xt, yt)
    listing = root / "list.csv"
    rows = [f"{p.relative_to(root)},{CLASSES[c]},{'test' if 'test' in p.parts else 'train'}"
            for p, c in zip(list((root / "train").rglob("*.png")) + test_files,
                            [CLASSES.index(p.parent.name) for p in (root / "train").rglob("*.png")] + list(yt))]
    listing.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    np.savez(npz / "t.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    for spec in (f"folder:{root}", f"csv:{listing}", f"npz:{npz / 't.npz'}"):
        out = npz / f"{spec[:3]}.json"
        assert cli.main(["eval", "--checkpoint", str(run), "--data", spec, "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["num_samples"] == 12 and np.array(report["confusion_matrix"]).sum() == 12
        assert report["split"] == "test" and report["checkpoint"].endswith("checkpoint.pt (epoch 2)")
    capsys.readouterr()
    (root / "test").rename(root / "gone")
    assert cli.main(["eval", "--checkpoint", str(run), "--data", f"folder:{root}"]) == 2
    assert "no test/ split" in _one_error(capsys)
    listing.write_text("".join(r.replace(",test", ",train") + "\n" for r in rows))
    assert cli.main(["eval", "--checkpoint", str(run), "--data", f"csv:{listing}"]) == 2
    assert "no row of the test split" in _one_error(capsys)


def test_eval_metrics_match_the_numpy_fallback(monkeypatch):
    pytest.importorskip("sklearn")
    from l2b.apps import predict

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 50), rng.integers(0, 2, 50)  # class 2 is never predicted
    with_sklearn = predict.classification_report(y_true, y_pred, CLASSES)
    monkeypatch.setattr(predict, "has_sklearn", False)
    fallback = predict.classification_report(y_true, y_pred, CLASSES)
    assert fallback["confusion_matrix"] == with_sklearn["confusion_matrix"]
    for got, want in zip(fallback["per_class"], with_sklearn["per_class"]):
        assert got == pytest.approx(want)
    assert with_sklearn["per_class"][2]["precision"] == 0.0
    assert with_sklearn["accuracy"] == np.mean(y_true == y_pred)


def test_eval_and_predict_never_overwrite(run, npz, capsys):
    np.savez(npz / "new.npz", x=bands(5, 7)[0])
    mine = npz / "mine.json"
    mine.write_text("keep")
    for argv, message in [
        (["eval", "--checkpoint", str(run), "--out", str(mine)], "already exists"),
        (["eval", "--checkpoint", str(run), "--out", str(npz / "x.csv")], "must end in .json"),
        (["eval", "--checkpoint", str(run), "--plot", str(mine)], "must end in .png"),
        (["predict", "--checkpoint", str(run), "--data", f"npz:{npz / 'new.npz'}", "--out", str(mine)],
         "must end in .csv"),
        (["predict", "--checkpoint", str(run), "--data", f"npz:{npz / 'new.npz'}", "--out", str(npz / "d.npz")],
         "must end in .csv"),
        (["eval", "--checkpoint", str(run / "config.yaml")], "not a run folder or a .pt file"),
        (["eval", "--checkpoint", str(npz / "nowhere" / "best.pt")], "not found"),
        (["eval", "--checkpoint", str(run), "--data", f"npz:{npz / 'new.npz'}"], "has no labels"),
    ]:
        assert cli.main(argv) == 2, argv
        assert message in _one_error(capsys)
    assert mine.read_text() == "keep"
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"npz:{npz / 'new.npz'}"]) == 0
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"npz:{npz / 'new.npz'}"]) == 0
    assert (run / "predictions.csv").is_file() and (run / "predictions-2.csv").is_file()
