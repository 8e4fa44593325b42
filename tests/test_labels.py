"""Label issues, predictions, the estimator and the pseudo meta set, on small synthetic data."""

import csv
import json
import re
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

import l2b
from l2b import cli
from l2b import make_config
from l2b import ImageData
from l2b import L2BError
from l2b import train
from l2b.apps import labels as labels_app
from l2b.apps.label_compare import LOGREG_CS, cross_validated_probs
from l2b.apps.labels import accuracy_warning, estimate_noise
from l2b.config import save_yaml
from l2b.scores import auroc
from l2b.data.metaset import select_pseudo_meta
from l2b.data.noise import transition_matrix
from l2b.runfiles import per_sample_table, read_table, write_table

K = 3


def _images(n, rng):
    """(n, 1, 8, 8) uint8: class c lights up horizontal band c, plus noise."""
    y = rng.integers(0, K, n)
    x = rng.integers(0, 90, (n, 1, 8, 8))
    for c in range(K):
        x[y == c, :, 2 * c + 1 : 2 * c + 4, :] += 150
    return x.astype(np.uint8), y.astype(np.int64)


def _image_data(seed=0):
    rng = np.random.default_rng(seed)
    x, y = _images(360, rng)
    xt, yt = _images(90, rng)
    return ImageData("bands", ["low", "mid", "high"], x, y, xt, yt)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short L2B run with 40% symmetric noise on an npz file (so `--compare-cleanlab` can reload it); its folder."""
    folder = tmp_path_factory.mktemp("runs")
    d = _image_data()
    np.savez(folder / "bands.npz", x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test,
             classes=np.array(d.classes))
    cfg = make_config(dict(dataset=f"npz:{folder / 'bands.npz'}", subset=180, val_size=60, epochs=4, batch_size=45,
                           val_batch_size=30, lr=0.05, noise="sym", noise_rate=0.4, eval_batch_size=200,
                           device="cpu", out=str(folder / "l2b")))
    train(cfg, progress=False)
    return folder / "l2b"


# ---------------------------------------------------------------- AUROC

def test_auroc_hand_checked_case():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered correctly
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 0])) == 1.0
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([0, 0, 1])) == 0.0


def test_auroc_ties_count_half():
    assert auroc(np.ones(5), np.array([1, 0, 1, 0, 0])) == pytest.approx(0.5)
    # positive at 1 ties one negative (1/2) and beats the other (1): 1.5 / 2
    assert auroc(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])) == pytest.approx(0.75)


def test_auroc_matches_pairwise_count_and_handles_one_class():
    rng = np.random.default_rng(3)
    s, p = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3
    pos, neg = s[p][:, None], s[~p][None, :]
    brute = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (p.sum() * (~p).sum())
    assert auroc(s, p) == pytest.approx(brute)
    assert auroc(s, np.zeros(200, bool)) is None  # nothing to rank


# ---------------------------------------------------------------- run folder and `l2b labels`

def test_run_folder_records_every_training_sample(run):
    table = read_table(run / "per_sample.csv")
    idx = np.load(run / "train_indices.npy")
    assert len(table["index"]) == 180 and np.array_equal(table["index"], idx)
    data = _image_data()
    assert np.array_equal(np.load(run / "true_labels.npy"), data.y_train[idx])
    assert np.array_equal(table["true_label"], data.y_train[idx])
    assert np.array_equal(table["given_label"], np.load(run / "noisy_labels.npy"))
    assert (table["meta_steps"] > 0).all()  # every sample went through meta steps after warm-up
    assert np.all((table["disagreement_rate"] >= 0) & (table["disagreement_rate"] <= 1))
    norm = json.loads((run / "normalization.json").read_text())
    assert norm["input_shape"] == [1, 8, 8] and len(norm["mean"]) == 1


def _written(out: str) -> tuple[Path, Path]:
    """The table and JSON that `l2b labels` says it wrote."""
    table, name = re.search(r"written to (\S+) and (\S+)$", out.splitlines()[0]).groups()
    return Path(table), Path(table).with_name(name)


def test_labels_cli_sorted_ranged_and_flipped_score_lower(run, capsys):
    assert cli.main(["labels", str(run)]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "F1" in out
    table_path, json_path = _written(out)
    with open(table_path) as fh:
        header = next(csv.reader(fh))
    assert header[:8] == ["index", "given_label", "suggested_label", "label_quality", "is_label_issue",
                          "alpha_mean", "beta_mean", "disagreement_rate"]
    assert "given_name" in header
    issues = read_table(table_path)
    q = issues["label_quality"]
    assert len(q) == 180 and np.all(np.diff(q) >= 0)
    assert np.all((q >= 0) & (q <= 1))
    report = json.loads(json_path.read_text())
    # the trusted set's estimate decides how many: the lowest-quality ones, that many
    n_flag = int(issues["is_label_issue"].sum())
    assert n_flag == round(report["estimated_wrong"]) and issues["is_label_issue"][:n_flag].all()
    # the truly flipped labels get a lower quality on average
    table = read_table(run / "per_sample.csv")
    true = dict(zip(table["index"], table["true_label"]))
    flipped = issues["given_label"] != np.array([true[i] for i in issues["index"]])
    assert 0 < flipped.sum() < len(flipped)
    assert q[flipped].mean() < q[~flipped].mean()
    row = report["rows"][0]
    assert row["name"] == "l2b" and row["flipped"] == int(flipped.sum()) and 0.5 < row["auroc"] <= 1
    tp = int(np.sum(issues["is_label_issue"] & flipped))
    assert row["precision"] == pytest.approx(tp / n_flag) and row["recall"] == pytest.approx(tp / flipped.sum())
    val = np.load(run / "val_probs.npy")  # the final model on the trusted set, beside train_probs.npy
    assert val.shape == (60, K) and np.allclose(val.sum(1), 1, atol=1e-5)
    assert report["clean_accuracy"] == pytest.approx(np.mean(val.argmax(1) == np.load(run / "val_labels.npy")))


def test_labels_threshold_flag_replaces_the_estimated_count(run, capsys):
    assert cli.main(["labels", str(run), "--threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "label_quality < 0.3" in out
    issues = read_table(_written(out)[0])
    assert np.array_equal(issues["is_label_issue"], issues["label_quality"] < 0.3)
    assert cli.main(["labels", str(run), "--threshold", "1.5"]) == 2
    assert "--threshold must be in [0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------- the noise estimate and the flag count

def _noisy_pairs(rng, n, k, rate, accuracy, pairs=False):
    """True labels, given labels (``rate`` flipped: to a random other class, or to the next class when
    ``pairs``) and a model's predictions that are right with probability ``accuracy``, else uniform."""
    true = rng.integers(0, k, n)
    flip = rng.random(n) < rate
    other = (true + 1) % k if pairs else (true + rng.integers(1, k, n)) % k
    given = np.where(flip, other, true)
    model = lambda y: np.where(rng.random(len(y)) < accuracy, y, rng.integers(0, k, len(y)))  # noqa: E731
    return true, given, model


@pytest.mark.parametrize("pairs", [False, True])
def test_estimate_noise_recovers_rate_and_transition(pairs):
    rng = np.random.default_rng(7)
    k = 5
    true, given, model = _noisy_pairs(rng, 20000, k, 0.3, 0.8, pairs)
    trusted = np.repeat(np.arange(k), 400)
    pred = model(true)
    est = estimate_noise(given, pred, trusted, model(trusted), num_classes=k)
    realised = transition_matrix(true, given, k)
    assert est.rate == pytest.approx(np.mean(given != true), abs=0.02)
    assert np.abs(est.transition - realised).max() < 0.06
    assert np.allclose(est.transition.sum(1), 1) and est.clean_accuracy == pytest.approx(0.84, abs=0.03)
    # the posterior says where the wrong labels are (here about 0.72 where the prediction disagrees, 0.02 where not)
    assert est.p_wrong[pred != given].mean() > 0.6 and est.p_wrong[pred == given].mean() < 0.05
    assert est.num_wrong == pytest.approx(est.p_wrong.sum()) and est.rate == pytest.approx(est.p_wrong.mean())
    # BIC keeps the one-parameter model for symmetric noise, the full matrix for class pairs
    assert est.structure == ("full" if pairs else "symmetric") and est.bic[est.structure] == min(est.bic.values())


def test_posterior_quality_orders_like_prob_given_under_symmetric_noise_and_knows_impossible_labels():
    rng = np.random.default_rng(3)
    k, n = 4, 300
    probs = rng.dirichlet(np.ones(k), n)
    given = rng.integers(0, k, n)
    sym = 0.7 * np.eye(k) + 0.1 * (1 - np.eye(k))
    q = labels_app.posterior_right(probs, given, sym)
    pg = probs[np.arange(n), given]
    assert np.array_equal(np.argsort(q, kind="stable"), np.argsort(pg, kind="stable"))
    pair = np.eye(k)
    pair[0] = [0.6, 0.4, 0, 0]  # only class 0 is ever mislabelled, as 1: a given 2 or 3 is always right
    q = labels_app.posterior_right(probs, given, pair)
    assert np.all(q[given >= 2] == 1.0) and np.all(q[given == 0] == 1.0)  # nothing turns into a 0 either
    assert np.all(q[given == 1] < 1.0)


def _fake_run(folder, *, n=2000, k=5, rate=0.3, method="l2b", truth=True, accuracy=0.85, seed=0):
    """A run folder written by hand: per_sample.csv with known flips, the trusted set's predictions."""
    rng = np.random.default_rng(seed)
    true, given, model = _noisy_pairs(rng, n, k, rate, accuracy)
    pred = model(true)
    probs = np.full((n, k), 0.1 / (k - 1))
    probs[np.arange(n), pred] = 0.9
    probs += rng.random((n, k)) * 0.05  # ties broken at random
    probs /= probs.sum(1, keepdims=True)
    records = {"alpha_sum": rng.random(n), "beta_sum": rng.random(n), "count": np.full(n, 10),
               "disagree": rng.integers(0, 11, n), "last_pseudo": pred, "last_prob": probs.max(1)}
    folder.mkdir(parents=True)
    write_table(per_sample_table(records, given, np.arange(n), probs, true if truth else None),
                folder / "per_sample.csv")
    trusted = np.repeat(np.arange(k), 400)
    val = np.full((len(trusted), k), 0.1 / (k - 1))
    val[np.arange(len(trusted)), model(trusted)] = 0.9
    np.save(folder / "val_probs.npy", val)
    np.save(folder / "val_labels.npy", trusted)
    save_yaml(make_config(dict(method=method, noise="sym" if truth else "none")), folder / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({"method": method, "train_seconds": 12.5}))
    return int(np.sum(given != true))


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_flag_count_follows_the_estimated_noise_rate(tmp_path, rate, capsys):
    wrong = _fake_run(tmp_path / "run", rate=rate)
    assert cli.main(["labels", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "label_issues.json").read_text())
    flagged = report["rows"][0]["flagged"]
    assert flagged == round(report["estimated_wrong"])
    # the realised number of flips, within 3 points of noise rate (the trusted set's 2,000 samples measure the
    # model's accuracy to about 0.7 points, and the estimate inherits that, about 0.9 points here)
    assert abs(flagged - wrong) < 0.03 * 2000
    assert f"{flagged} of 2000 labels flagged" in capsys.readouterr().out


def test_without_truth_no_evaluation_and_the_row_names_the_method(tmp_path, capsys):
    _fake_run(tmp_path / "ce", method="ce", truth=False)
    assert cli.main(["labels", str(tmp_path / "ce")]) == 0
    first, *rest = capsys.readouterr().out.splitlines()
    assert "labels flagged in this ce run" in first and rest == []  # counts only: no table at all
    row = json.loads((tmp_path / "ce" / "label_issues.json").read_text())["rows"][0]
    assert row["name"] == "ce" and "precision" not in row and row["seconds"] == 12.5
    # truth known (synthetic noise): the table's row still names the run's method
    _fake_run(tmp_path / "mixup", method="mixup")
    assert cli.main(["labels", str(tmp_path / "mixup")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert any(line.split()[:1] == ["mixup"] for line in table) and not any(" l2b " in line for line in table)


def test_no_wrong_labels_injected_means_no_evaluation(tmp_path, capsys):
    _fake_run(tmp_path / "clean", rate=0.0)  # true labels known and equal to the given ones (noise none)
    assert cli.main(["labels", str(tmp_path / "clean")]) == 0
    assert "precision" not in capsys.readouterr().out


def test_weak_model_warns_in_one_line(tmp_path, capsys):
    assert accuracy_warning(0.12, 10).startswith("the model is near chance")
    assert accuracy_warning(0.45, 10).startswith("the model is weak")
    assert accuracy_warning(0.80, 10) is None
    _fake_run(tmp_path / "weak", accuracy=0.05)  # 24% right on 5 classes: near chance
    assert cli.main(["labels", str(tmp_path / "weak")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l2b: warning: the model is near chance")
    _fake_run(tmp_path / "good", accuracy=0.85)
    assert cli.main(["labels", str(tmp_path / "good")]) == 0
    assert capsys.readouterr().err == ""


def test_a_second_call_numbers_its_outputs_and_keeps_the_first(tmp_path, capsys):
    _fake_run(tmp_path / "run")
    assert cli.main(["labels", str(tmp_path / "run")]) == 0
    first = _written(capsys.readouterr().out)
    assert first == (tmp_path / "run" / "label_issues.csv", tmp_path / "run" / "label_issues.json")
    first[0].write_text("my review notes\n")  # someone has been working through the table
    assert cli.main(["labels", str(tmp_path / "run"), "--threshold", "0.2"]) == 0
    second = _written(capsys.readouterr().out)
    assert second == (tmp_path / "run" / "label_issues-2.csv", tmp_path / "run" / "label_issues-2.json")
    assert first[0].read_text() == "my review notes\n" and second[0].is_file() and second[1].is_file()


def test_without_trusted_set_the_threshold_decides_and_says_so(tmp_path, capsys):
    _fake_run(tmp_path / "run")
    (tmp_path / "run" / "val_probs.npy").unlink()
    assert cli.main(["labels", str(tmp_path / "run")]) == 0
    assert "no val_probs.npy" in capsys.readouterr().out
    issues = read_table(tmp_path / "run" / "label_issues.csv")
    assert np.array_equal(issues["is_label_issue"], issues["label_quality"] < 0.5)


def test_auroc_from_sklearn_equals_the_rank_statistic():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(5)
    s, p = rng.integers(0, 7, 500).astype(float), rng.random(500) < 0.4  # many ties
    assert auroc(s, p, use_sklearn=False) == pytest.approx(auroc(s, p), abs=1e-12)


# ---------------------------------------------------------------- cleanlab, cross-validated

def test_compare_cleanlab_cross_validates_both_models(run, capsys):
    pytest.importorskip("cleanlab")
    assert cli.main(["labels", str(run), "--compare-cleanlab", "--cv-model", "logreg", "model",
                     "--cv-folds", "3", "--cv-epochs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cleanlab, 3-fold logreg" in out and "cleanlab, 3-fold small-cnn CE" in out
    rows = json.loads(_written(out)[1].read_text())["rows"]
    assert [r["name"] for r in rows] == ["l2b", "cleanlab, 3-fold logreg", "cleanlab, 3-fold small-cnn CE"]
    for r in rows:
        assert r["flipped"] == rows[0]["flipped"] and 0 <= r["f1"] <= 1 and 0 <= r["auroc"] <= 1 and r["seconds"] > 0
    assert rows[1]["C"] in LOGREG_CS and rows[2]["epochs"] == 2


def test_logreg_probabilities_are_sklearns_out_of_fold_ones():
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _images(150, np.random.default_rng(2))
    probs, details = cross_validated_probs(x, y, num_classes=K, cv_model="logreg", folds=3, seed=4)
    oracle = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=details["C"], max_iter=1000)),
                               x.reshape(150, -1).astype(np.float32), y, method="predict_proba",
                               cv=StratifiedKFold(3, shuffle=True, random_state=4))
    np.testing.assert_allclose(probs, oracle, atol=1e-6)
    with pytest.raises(L2BError, match="--cv-folds 60"):
        cross_validated_probs(x, y, num_classes=K, cv_model="logreg", folds=60, seed=0)


def test_compare_cleanlab_refuses_a_data_set_the_run_did_not_train_on(run, tmp_path, capsys):
    pytest.importorskip("cleanlab")
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    d = _image_data(seed=1)  # same shapes, other images and labels
    np.savez(tmp_path / "other.npz", x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "dataset": f"npz:{tmp_path / 'other.npz'}"}))
    assert cli.main(["labels", str(copy), "--compare-cleanlab"]) == 2
    assert "is not the one the run trained on" in capsys.readouterr().err


def test_compare_cleanlab_without_cleanlab_says_how_to_install(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab now raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    assert cli.main(["labels", str(run), "--compare-cleanlab"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2b: error: --compare-cleanlab needs cleanlab") and "pip install 'l2b[cleanlab]'" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- `l2b predict` and `l2b eval`

def test_predict_and_eval_cli(run, tmp_path, capsys):
    x, y = _images(37, np.random.default_rng(9))
    np.savez(tmp_path / "new.npz", x=x[:, 0], y=y)  # (N, H, W): one channel, added back on load
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"npz:{tmp_path / 'new.npz'}",
                     "--out", str(out)]) == 0
    pred = read_table(out)
    assert len(pred["index"]) == 37
    probs = np.stack([pred[f"prob_{k}"] for k in range(K)], 1)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert np.array_equal(pred["predicted"], probs.argmax(1))
    capsys.readouterr()
    cm_out = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(run), "--data", f"npz:{tmp_path / 'new.npz'}",
                     "--out", str(cm_out)]) == 0
    assert "accuracy" in capsys.readouterr().out
    cm = np.array(json.loads(cm_out.read_text())["confusion_matrix"])
    assert cm.shape == (K, K) and cm.sum() == 37
    assert cm.trace() == int(np.sum(pred["predicted"] == y))


def test_predict_and_eval_from_image_folder_and_csv(run, tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    x, y = _images(12, np.random.default_rng(4))
    classes = ["low", "mid", "high"]
    for i in range(12):  # folder:PATH with one sub-folder per class (the labels for eval)
        (tmp_path / "imgs" / classes[y[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, 0]).save(tmp_path / "imgs" / classes[y[i]] / f"{i:02d}.png")
    npz = tmp_path / "same.npz"
    np.savez(npz, x=x[:, 0], y=y)
    out_npz, out_dir = tmp_path / "p_npz.csv", tmp_path / "p_dir.csv"
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"npz:{npz}", "--out", str(out_npz)]) == 0
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"folder:{tmp_path / 'imgs'}",
                     "--out", str(out_dir)]) == 0
    from_dir, from_npz = read_table(out_dir), read_table(out_npz)
    order = [int(Path(p).stem) for p in from_dir["path"]]  # files are read in sorted path order
    np.testing.assert_allclose(np.asarray(from_dir["prob_0"], float), np.asarray(from_npz["prob_0"], float)[order],
                               atol=1e-5)  # PNG round trip is lossless: same inputs, same outputs
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--data", f"folder:{tmp_path / 'imgs'}",
                     "--out", str(tmp_path / "cm.json")]) == 0
    assert "on 12 samples" in capsys.readouterr().out
    listing = tmp_path / "imgs" / "list.csv"
    rows = [f"{classes[y[i]]}/{i:02d}.png,{classes[y[i]]}" for i in range(12)]
    listing.write_text("path,label\n" + "\n".join(rows) + "\n")
    assert cli.main(["eval", "--checkpoint", str(run), "--data", f"csv:{listing}",
                     "--out", str(tmp_path / "cm2.json")]) == 0
    assert "on 12 samples" in capsys.readouterr().out
    listing.write_text("../../escape.png,low\n")
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"csv:{listing}"]) == 2
    assert "escapes the folder" in capsys.readouterr().err


def test_predict_rejects_bad_inputs(run, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2, 8, 8), np.uint8))
    assert cli.main(["predict", "--checkpoint", str(run), "--data", f"npz:{tmp_path / 'bad.npz'}"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(run), "--data", "parquet:x"]) == 2
    assert "unknown data source" in capsys.readouterr().err


# ---------------------------------------------------------------- the pseudo meta set

def test_pseudo_meta_set_picks_agreeing_confident_balanced_samples():
    g = torch.Generator().manual_seed(0)
    n = 300
    labels = torch.arange(n) % K
    probs = torch.softmax(torch.randn(n, K, generator=g) * 3, 1)
    idx = select_pseudo_meta(probs, labels, size=30, confidence=0.6)
    conf, pred = probs.max(1)
    assert len(idx) > 0 and len(set(idx.tolist())) == len(idx)
    assert torch.all(pred[idx] == labels[idx]) and torch.all(conf[idx] >= 0.6)
    eligible = (pred == labels) & (conf >= 0.6)
    counts = torch.bincount(labels[idx], minlength=K)
    for c in range(K):  # 10 per class, or all a short class has; the most confident ones
        members = eligible & (labels == c)
        assert counts[c] == min(10, int(members.sum()))
        left_out = members.clone()
        left_out[idx] = False
        if left_out.any():
            assert conf[idx][labels[idx] == c].min() >= conf[left_out].max()


def test_pseudo_meta_set_short_class_and_nothing_eligible():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 3 + [[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    idx = select_pseudo_meta(probs, labels, size=6, confidence=0.7)
    assert idx.tolist() == [0, 1, 3, 5]  # class 0: 2 of 3 (ties keep order); class 1: 4 predicts 0
    assert len(select_pseudo_meta(probs, labels, size=6, confidence=0.95)) == 0


# ---------------------------------------------------------------- the estimator

def _features(seed=0, n=240):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, 6)) * 3
    y = rng.integers(0, K, n)
    return (centers[y] + rng.normal(size=(n, 6))).astype(np.float32), y, centers


def test_estimator_params_round_trip():
    clf = l2b.L2BClassifier(epochs=3, lr=0.1)
    params = clf.get_params()
    assert params["epochs"] == 3 and params["lr"] == 0.1 and params["module"] is None
    assert clf.set_params(batch_size=32, meta_set="pseudo") is clf
    assert clf.get_params() == {**params, "batch_size": 32, "meta_set": "pseudo"}
    assert l2b.L2BClassifier(**clf.get_params()).get_params() == clf.get_params()
    with pytest.raises(ValueError, match="(?i)invalid parameter"):
        clf.set_params(epoch=3)


def test_estimator_clone_predicts_identically_and_ranks_labels():
    x, y, centers = _features(n=180)
    flip = np.random.default_rng(1).random(len(y)) < 0.3
    y_noisy = np.where(flip, (y + 1) % K, y)
    yv = np.repeat(np.arange(K), 10)
    xv = (centers[yv] + np.random.default_rng(2).normal(size=(len(yv), 6))).astype(np.float32)
    names = np.array(["a", "b", "c"])
    clf = l2b.L2BClassifier(epochs=3, batch_size=60, val_batch_size=30, device="cpu", random_state=5)
    clf.fit(x, names[y_noisy], xv, names[yv])
    clone = l2b.L2BClassifier(**clf.get_params()).fit(x, names[y_noisy], xv, names[yv])
    np.testing.assert_array_equal(clf.predict_proba(x), clone.predict_proba(x))
    assert set(clf.predict(x)) <= set(names) and clf.score(x, names[y]) > 0.6
    issues = clf.label_issues()
    q = np.asarray(issues["label_quality"])
    assert np.all(np.diff(q) >= 0) and len(q) == len(y)
    assert set(np.asarray(issues["given_label"])) <= set(names)
    by_index = np.empty(len(y))
    by_index[np.asarray(issues["index"])] = q
    assert by_index[flip].mean() < by_index[~flip].mean()


def test_estimator_without_clean_set():
    x, y, _ = _features(seed=3, n=150)
    with pytest.raises(L2BError, match="trusted set"):
        l2b.L2BClassifier(meta_set="clean", epochs=2).fit(x, y)
    clf = l2b.L2BClassifier(epochs=3, batch_size=50, pseudo_size=30, device="cpu").fit(x, y)  # meta_set auto -> pseudo
    assert clf.history_[-1]["val_acc"] is None and 0 < clf.history_[-1]["meta_size"] <= 30
    assert clf.predict(x[:7]).shape == (7,)
    with pytest.raises(L2BError, match="not fitted"):
        l2b.L2BClassifier().predict(x)


def test_pseudo_meta_set_run_resumes_bit_exactly(tmp_path):
    """The pseudo meta set and its cycling position travel in the checkpoint (refresh every 2 epochs,
    so the resumed epoch must reuse the saved set rather than pick a new one)."""
    import shutil

    full = tmp_path / "full"
    cfg = make_config(dict(subset=120, val_size=0, meta_set="pseudo", pseudo_size=30, meta_refresh=2,
                           epochs=4, batch_size=30, val_batch_size=15, keep_checkpoints=5, eval_batch_size=200,
                           device="cpu", out=str(full)))
    train(cfg, progress=False, data=_image_data())
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.copy(part / "checkpoint-epoch0002.pt", part / "checkpoint.pt")
    train(None, resume=part, progress=False, data=_image_data())
    assert (full / "per_sample.csv").read_text() == (part / "per_sample.csv").read_text()
    sizes = [m.get("meta_size") for m in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())]
    assert sizes[0] is None and all(0 < s <= 30 for s in sizes[1:])
