"""Label issues, predictions, the estimator and the pseudo meta set, on small synthetic data."""

import csv
import json

from pathlib import Path

import numpy as np
import pytest
import torch

import l2b
from l2b import cli
from l2b import make_config
from l2b import ImageData
from l2b import L2BError
from l2b.apps.labels import auroc
from l2b.runfiles import read_table
from l2b.data.metaset import select_pseudo_meta
from l2b import train

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
    """One short L2B run with 40% symmetric noise; its folder."""
    out = tmp_path_factory.mktemp("runs") / "l2b"
    cfg = make_config(dict(subset=180, val_size=60, epochs=4, batch_size=45, val_batch_size=30, lr=0.05,
                           noise="sym", noise_rate=0.4, eval_batch_size=200, device="cpu", out=str(out)))
    train(cfg, progress=False, data=_image_data())
    return out


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
    assert np.isnan(auroc(s, np.zeros(200, bool)))


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


def test_labels_cli_sorted_ranged_and_flipped_score_lower(run, capsys):
    assert cli.main(["labels", str(run), "--threshold", "0.5"]) == 0
    assert "AUROC" in capsys.readouterr().out
    with open(run / "label_issues.csv") as fh:
        header = next(csv.reader(fh))
    assert header[:8] == ["index", "given_label", "suggested_label", "label_quality", "is_label_issue",
                          "alpha_mean", "beta_mean", "disagreement_rate"]
    assert "given_name" in header
    issues = read_table(run / "label_issues.csv")
    q = issues["label_quality"]
    assert len(q) == 180 and np.all(np.diff(q) >= 0)
    assert np.all((q >= 0) & (q <= 1))
    assert np.array_equal(issues["is_label_issue"], q < 0.5)
    # the truly flipped labels get a lower quality on average
    table = read_table(run / "per_sample.csv")
    true = dict(zip(table["index"], table["true_label"]))
    flipped = issues["given_label"] != np.array([true[i] for i in issues["index"]])
    assert 0 < flipped.sum() < len(flipped)
    assert q[flipped].mean() < q[~flipped].mean()
    ev = json.loads((run / "label_issues_eval.json").read_text())
    assert ev["num_flipped"] == int(flipped.sum()) and 0.5 < ev["auroc"] <= 1


def test_compare_cleanlab_says_what_is_missing(run, capsys):
    pytest.importorskip("torch")
    try:
        import cleanlab  # noqa: F401
        pytest.skip("cleanlab is installed")
    except ImportError:
        pass
    assert cli.main(["labels", str(run), "--compare-cleanlab"]) == 2
    assert "cleanlab" in capsys.readouterr().err


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
