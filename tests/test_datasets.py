"""Loaders on tiny files in each real on-disk format, through the code users run; every bad-input case."""

import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from l2b import cli
from l2b import make_config
from l2b.data.arrays import balanced_order
from l2b.data import data_check, load_dataset
from l2b import L2BError

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def _no_user_data(tmp_path, monkeypatch):
    """Never find (or fetch into) the user's real data folders."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("L2B_DATA", raising=False)


def _cfg(**kw):
    kw.setdefault("subset", 0)
    kw.setdefault("val_size", 4)
    return make_config(kw)


def _rng_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ---------------------------------------------------------------- IDX gz (Fashion-MNIST layout)

def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def _fashion(tmp_path, n=40):
    d = tmp_path / "fm"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte.gz", _rng_images(n, (28, 28)))
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(n) % 10)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", _rng_images(10, (28, 28), 1))
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    return d


def test_fashion_mnist_idx_files(tmp_path):
    data = load_dataset(_cfg(data_dir=str(_fashion(tmp_path))))
    assert data.x_train.shape == (40, 1, 28, 28) and data.num_classes == 10
    np.testing.assert_array_equal(data.y_train, np.arange(40) % 10)


def test_corrupt_gz(tmp_path):
    d = _fashion(tmp_path)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(L2BError, match=r"train-labels-idx1-ubyte\.gz: not a readable gzip file"):
        load_dataset(_cfg(data_dir=str(d)))


# ---------------------------------------------------------------- CIFAR python batches

def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # the published batches are protocol-2 pickles with bytes keys


def _cifar10(tmp_path, n=20):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _pickle(d / f"data_batch_{i}", {b"data": _rng_images(n, (3072,), i), b"labels": list(np.arange(n) % 10),
                                        b"batch_label": b"training batch", b"filenames": [b"x.png"] * n})
    _pickle(d / "test_batch", {b"data": _rng_images(10, (3072,), 9), b"labels": list(range(10))})
    _pickle(d / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                                  b"frog", b"horse", b"ship", b"truck"]})
    return d


def test_cifar10_batches(tmp_path):
    _cifar10(tmp_path)
    data = load_dataset(_cfg(dataset="cifar10", data_dir=str(tmp_path)))
    assert data.x_train.shape == (100, 3, 32, 32) and data.classes[9] == "truck"
    assert data.y_train.dtype == np.int64 and set(data.y_train) == set(range(10))


def test_cifar100_coarse_labels_drive_asym_noise(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fine = np.arange(200) % 100
    coarse_of = np.random.default_rng(0).permutation(np.repeat(np.arange(20), 5))
    _pickle(d / "train", {b"data": _rng_images(200, (3072,)), b"fine_labels": list(fine),
                          b"coarse_labels": list(coarse_of[fine])})
    _pickle(d / "test", {b"data": _rng_images(100, (3072,)), b"fine_labels": list(range(100)),
                         b"coarse_labels": list(coarse_of)})
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    cfg = _cfg(dataset="cifar100", data_dir=str(tmp_path), noise="asym", noise_rate=0.5, val_size=100)
    data = load_dataset(cfg)
    np.testing.assert_array_equal(data.coarse, coarse_of)
    report = data_check(cfg)
    t = np.asarray(report["transition_matrix"])
    for i, j in zip(*np.nonzero(t * (1 - np.eye(100)))):  # every flip stays inside the superclass
        assert coarse_of[i] == coarse_of[j]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = _cifar10(tmp_path)
    _pickle(d / "data_batch_3", {b"data": _Evil(), b"labels": []})
    with pytest.raises(L2BError, match=r"data_batch_3: not a CIFAR batch \(refused global (posix|os)\.system"):
        load_dataset(_cfg(dataset="cifar10", data_dir=str(tmp_path)))
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_pickle(tmp_path):
    d = _cifar10(tmp_path)
    raw = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(L2BError, match=r"test_batch: corrupt pickle"):
        load_dataset(_cfg(dataset="cifar10", data_dir=str(tmp_path)))


def test_cifar_labels_out_of_range(tmp_path):
    d = _cifar10(tmp_path)
    _pickle(d / "test_batch", {b"data": _rng_images(10, (3072,)), b"labels": [10] + list(range(9))})
    with pytest.raises(L2BError, match=r"test labels: label 10 at entry 0 is out of range"):
        load_dataset(_cfg(dataset="cifar10", data_dir=str(tmp_path)))


def test_cifar_offline_message(tmp_path, monkeypatch):
    import l2b.data.benchmarks as ds

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(ds, "fetch", offline)
    with pytest.raises(L2BError, match=r"cifar10 not found on disk and fetching cifar-10-python\.tar\.gz failed"):
        load_dataset(_cfg(dataset="cifar10", data_dir=str(tmp_path)))


# ---------------------------------------------------------------- npz

def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_layouts_and_float_images(tmp_path):
    x = np.random.default_rng(0).random((12, 6, 6, 3)).astype(np.float32)  # N x H x W x C in [0, 1]
    name = _npz(tmp_path, x_train=x, y_train=np.arange(12) % 3, x_test=x[:3].transpose(0, 3, 1, 2),
                y_test=np.arange(3), x_val=x[:3], y_val=np.arange(3))
    data = load_dataset(_cfg(dataset=name))
    assert data.x_train.shape == (12, 3, 6, 6) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (3, 3, 6, 6) and data.num_classes == 3
    np.testing.assert_array_equal(data.x_train[0, :, 1, 2], np.rint(x[0, 1, 2] * 255).astype(np.uint8))


def test_npz_grey_nhw(tmp_path):
    name = _npz(tmp_path, x_train=_rng_images(8, (5, 5)), y_train=np.arange(8) % 2,
                x_test=_rng_images(2, (5, 5)), y_test=np.arange(2))
    assert load_dataset(_cfg(dataset=name)).image_shape == (1, 5, 5)


def test_npz_length_mismatch(tmp_path):
    name = _npz(tmp_path, x_train=_rng_images(8, (5, 5)), y_train=np.arange(7) % 2,
                x_test=_rng_images(2, (5, 5)), y_test=np.arange(2))
    with pytest.raises(L2BError, match=r"d\.npz: x_train has 8 images but y_train has 7 labels"):
        load_dataset(_cfg(dataset=name))


def test_npz_negative_label(tmp_path):
    name = _npz(tmp_path, x_train=_rng_images(4, (5, 5)), y_train=np.array([0, 1, -1, 1]),
                x_test=_rng_images(2, (5, 5)), y_test=np.arange(2))
    with pytest.raises(L2BError, match=r"d\.npz: y_train: negative label -1"):
        load_dataset(_cfg(dataset=name))


def test_npz_label_beyond_class_names(tmp_path):
    name = _npz(tmp_path, x_train=_rng_images(4, (5, 5)), y_train=np.array([0, 1, 2, 1]), classes=np.array(["a", "b"]),
                x_test=_rng_images(2, (5, 5)), y_test=np.arange(2))
    with pytest.raises(L2BError, match=r"d\.npz: label 2 is out of range for the 2 names"):
        load_dataset(_cfg(dataset=name))


def test_class_absent_from_clean_set(tmp_path):
    name = _npz(tmp_path, x_train=_rng_images(9, (5, 5)), y_train=np.arange(9) % 3, x_test=_rng_images(3, (5, 5)),
                y_test=np.arange(3), x_val=_rng_images(2, (5, 5)), y_val=np.array([0, 2]))
    with pytest.raises(L2BError, match=r"d\.npz: class 1 \('1'\) has no image in the clean \(val\) set"):
        load_dataset(_cfg(dataset=name))


def test_carved_clean_set_missing_a_class(tmp_path):
    name = _npz(tmp_path, x_train=_rng_images(9, (5, 5)), y_train=np.array([0] * 8 + [1]),
                x_test=_rng_images(2, (5, 5)), y_test=np.arange(2))
    with pytest.raises(L2BError, match=r"needs 2 images of class 1, the data has 1"):
        data_check(_cfg(dataset=name, val_size=4, noise="sym", noise_rate=0.2))  # labels as truth: noise on top


# ---------------------------------------------------------------- folders and CSV of images

def _png(path, size=(6, 6), colour=True, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = _rng_images(1, (size[1], size[0], 3) if colour else (size[1], size[0]), seed)[0]
    Image.fromarray(arr).save(path)


def _folder(tmp_path, sizes=None):
    root = tmp_path / "imgs"
    for split, n in (("train", 4), ("val", 1), ("test", 1)):
        for c in ("cat", "dog"):
            for i in range(n):
                _png(root / split / c / f"{i}.png", size=(sizes or {}).get((split, c, i), (6, 6)), seed=i)
    return root


def test_folder_loader(tmp_path):
    root = _folder(tmp_path)
    data = load_dataset(_cfg(dataset=f"folder:{root}"))
    assert data.classes == ["cat", "dog"] and data.x_train.shape == (8, 3, 6, 6)
    assert data.x_val.shape == (2, 3, 6, 6) and list(data.y_val) == [0, 1]


def test_folder_mixed_sizes_need_resize_flag(tmp_path):
    root = _folder(tmp_path, sizes={("train", "dog", 2): (9, 7)})
    with pytest.raises(L2BError, match=r"mixed image sizes: .*0\.png is 6x6, .*dog.2\.png is 9x7.*--image-size"):
        load_dataset(_cfg(dataset=f"folder:{root}"))
    data = load_dataset(_cfg(dataset=f"folder:{root}", image_size=5))
    assert data.image_shape == (3, 5, 5)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_corrupt_image_file(tmp_path, suffix):
    root = _folder(tmp_path)
    good = tmp_path / f"ok{suffix}"
    _png(good, size=(16, 16))
    bad = root / "train" / "cat" / f"broken{suffix}"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    with pytest.raises(L2BError, match=rf"broken\{suffix}: corrupt or unreadable image"):
        load_dataset(_cfg(dataset=f"folder:{root}"))


def _csv_set(tmp_path, rows):
    root = tmp_path / "set"
    for r in rows:
        if not r[0].startswith(".."):
            _png(root / r[0], colour=False)
    (root / "list.csv").write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    return root / "list.csv"


def test_csv_loader_with_names_and_grey_images(tmp_path):
    rows = [(f"a/{i}.png", "shoe" if i % 2 else "bag", "test" if i > 7 else "train") for i in range(10)]
    path = _csv_set(tmp_path, rows)
    data = load_dataset(_cfg(dataset=f"csv:{path}"))
    assert data.classes == ["bag", "shoe"] and data.x_train.shape == (8, 1, 6, 6) and len(data.y_test) == 2


def test_csv_path_escaping_its_folder(tmp_path):
    rows = [(f"a/{i}.png", str(i % 2), "train") for i in range(4)] + [("../outside.png", "0", "test")]
    path = _csv_set(tmp_path, rows)
    with pytest.raises(L2BError, match=r"list\.csv: path '\.\./outside\.png' escapes the folder"):
        load_dataset(_cfg(dataset=f"csv:{path}"))


def test_csv_negative_label(tmp_path):
    path = _csv_set(tmp_path, [("a/0.png", "0", "train"), ("a/1.png", "-2", "train"), ("a/2.png", "1", "test")])
    with pytest.raises(L2BError, match=r"list\.csv: negative label -2 on row 2"):
        load_dataset(_cfg(dataset=f"csv:{path}"))


# ---------------------------------------------------------------- ISIC2019 and Clothing1M layouts

def _isic(tmp_path, n=60):
    root = tmp_path / "isic2019"
    header = ["image", "MEL", "NV", "BCC", "UNK"]
    lines = [",".join(header)]
    for i in range(n):
        onehot = ["0.0"] * 4
        onehot[i % 3] = "1.0"
        lines.append(",".join([f"ISIC_{i:07d}"] + onehot))
        _png(root / "ISIC_2019_Training_Input" / f"ISIC_{i:07d}.jpg", size=(8 + i % 3, 8), seed=i)
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    return root


def test_isic2019_seeded_split_saved(tmp_path):
    _isic(tmp_path)
    cfg = _cfg(dataset="isic2019", data_dir=str(tmp_path), image_size=8)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.classes == ["MEL", "NV", "BCC"]  # the empty UNK column is dropped
    assert a.x_train.shape[1:] == (3, 8, 8)
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 60
    assert np.bincount(a.y_val).tolist() == [1, 1, 1]  # class-balanced clean set
    assert a.files["split.csv"] == b.files["split.csv"]  # seeded
    split_file = tmp_path / "split.csv"
    split_file.write_text(a.files["split.csv"].replace("train", "test", 1))
    c = load_dataset(_cfg(dataset="isic2019", data_dir=str(tmp_path), image_size=8, split_file=str(split_file)))
    assert len(c.y_test) == len(a.y_test) + 1


def test_isic_bad_onehot_row(tmp_path):
    root = _isic(tmp_path, n=6)
    csv_path = root / "ISIC_2019_Training_GroundTruth.csv"
    csv_path.write_text(csv_path.read_text().replace("1.0", "0.0", 1))
    with pytest.raises(L2BError, match=r"GroundTruth\.csv: line 2: expected exactly one 1"):
        load_dataset(_cfg(dataset="isic2019", data_dir=str(tmp_path), image_size=8))


def _clothing(tmp_path):
    root = tmp_path / "clothing1m"
    ann = root / "annotations"
    ann.mkdir(parents=True)
    noisy, clean = [], []
    for i in range(42):
        key = f"images/{i % 3}/{i}.jpg"
        _png(root / key, size=(10, 10), seed=i)
        noisy.append(f"{key} {i % 14}")
        if i < 28:
            clean.append(f"{key} {(i + 1) % 14}")
    (ann / "noisy_label_kv.txt").write_text("\n".join(noisy) + "\n")
    (ann / "clean_label_kv.txt").write_text("\n".join(clean) + "\n")
    (ann / "noisy_train_key_list.txt").write_text("\n".join(n.split()[0] for n in noisy[28:]) + "\n")
    (ann / "clean_val_key_list.txt").write_text("\n".join(c.split()[0] for c in clean[:14]) + "\n")
    (ann / "clean_test_key_list.txt").write_text("\n".join(c.split()[0] for c in clean[14:]) + "\n")
    return root


def test_clothing1m_key_lists_and_unknown_noise(tmp_path):
    _clothing(tmp_path)
    cfg = _cfg(dataset="clothing1m", data_dir=str(tmp_path), image_size=6, noise="none")
    data = load_dataset(cfg)
    assert data.num_classes == 14 and not data.train_labels_known
    assert data.x_train.shape == (14, 3, 6, 6) and len(data.y_val) == 14 and len(data.y_test) == 14
    report = data_check(cfg)
    assert report["noise"] == "given" and report["noise_rate_actual"] is None and report["transition_matrix"] is None


def test_clothing1m_key_escaping_root(tmp_path):
    root = _clothing(tmp_path)
    kl = root / "annotations" / "clean_test_key_list.txt"
    kl.write_text("../../etc/passwd\n")
    with pytest.raises(L2BError, match=r"clean_test_key_list\.txt: path '\.\./\.\./etc/passwd' escapes"):
        load_dataset(_cfg(dataset="clothing1m", data_dir=str(tmp_path), image_size=6))


def test_balanced_order_balances_every_batch():
    labels = torch.tensor([0] * 30 + [1] * 3 + [2] * 12)
    order = balanced_order(labels, 5, 9, torch.Generator().manual_seed(0))
    assert order.shape == (45,)
    for b in order.view(5, 9):
        assert torch.bincount(labels[b], minlength=3).tolist() == [3, 3, 3]


# ---------------------------------------------------------------- command line and training

def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    name = _npz(tmp_path, x_train=_rng_images(8, (5, 5)), y_train=np.arange(7) % 2,
                x_test=_rng_images(2, (5, 5)), y_test=np.arange(2))
    assert cli.main(["data", "check", "--dataset", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("l2b: error: ") and "d.npz" in err and err.count("\n") == 1


def test_cli_data_check_and_class_map_not_permutation(tmp_path, capsys):
    name = _npz(tmp_path, x_train=_rng_images(40, (5, 5)), y_train=np.arange(40) % 4,
                x_test=_rng_images(4, (5, 5)), y_test=np.arange(4))
    assert cli.main(["data", "check", "--dataset", name, "--val-size", "8", "--subset", "0",
                     "--noise", "pairflip", "--noise-rate", "0.25", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_train"] == 32 and report["clean_counts"] == [2, 2, 2, 2]
    assert report["noise_rate_actual"] == pytest.approx(0.25)
    perm = tmp_path / "perm.json"
    perm.write_text("[1, 0, 0, 3]")
    assert cli.main(["data", "check", "--dataset", name, "--val-size", "8", "--subset", "0", "--noise", "asym",
                     "--noise-rate", "0.4", "--noise-map", str(perm)]) == 2
    assert "perm.json: a class map given as a list must be a permutation" in capsys.readouterr().err


def test_train_on_npz_with_label_file(tmp_path):
    from l2b import train

    x = _rng_images(48, (3, 8, 8))
    y = np.arange(48) % 3
    name = _npz(tmp_path, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6], x_val=x[:6], y_val=y[:6])
    labels = tmp_path / "noisy.npy"
    np.save(labels, (y + (np.arange(48) % 4 == 0)) % 3)
    cfg = make_config({"dataset": name, "noise": f"file:{labels}", "subset": 0, "epochs": 1, "warmup_epochs": 0,
                       "batch_size": 16, "val_batch_size": 6, "method": "ce", "out": str(tmp_path / "run"),
                       "device": "cpu", "balanced_batches": 2})
    summary = train(cfg, progress=False)
    info = json.loads((tmp_path / "run" / "noise.json").read_text())
    assert info["noise_rate_actual"] == pytest.approx(0.25)
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "noisy_labels.npy"), np.load(labels))
    assert summary["epochs"] == 1


def test_resnet_without_torchvision_says_so():
    from l2b import models as _models

    if _models.has_torchvision:
        pytest.skip("torchvision is installed")
    with pytest.raises(L2BError, match=r"model 'resnet50' needs torchvision, which is not installed"):
        _models.create_model("resnet50", num_classes=3)
    assert "resnet18" in _models.list_models()  # listed everywhere; building it says what to install


def test_bench_data_reports_ratios(tmp_path):
    from l2b.apps.bench import bench_data

    r = bench_data(data_dir=str(_fashion(tmp_path, n=64)), subset=64, batch_size=32, repeats=1)
    assert r["images"] == 64 and r["source"] == "fashion-mnist"
    assert 0 < r["feed_over_ce_epoch"] < r["seconds"]["ce_epoch"] / r["seconds"]["feed"] + 1
