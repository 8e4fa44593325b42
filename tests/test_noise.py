"""Noise models: exact or within-tolerance rates, realised matrices against the intended ones, seeds."""

import json

import numpy as np
import pytest

from l2b.data import noise as _noise
from l2b import make_config
from l2b import ImageData
from l2b import L2BError


def _labels(n_per_class=200, k=5, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(k), n_per_class))


def _data(y, name="toy", classes=None, coarse=None, x=None):
    k = int(y.max()) + 1
    x = np.random.default_rng(1).integers(0, 256, (len(y), 1, 4, 4), dtype=np.uint8) if x is None else x
    return ImageData(name, classes or [f"c{i}" for i in range(k)], x, y, x[:4], y[:4], coarse=coarse)


def _intended_rows_ok(t):
    assert t.shape[0] == t.shape[1]
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-12)


def test_symmetric_hits_rate_exactly_and_never_keeps_the_class():
    y = _labels(n_per_class=2000)
    out = _noise.symmetric(y, 0.4, 5, np.random.default_rng(0))
    assert out.rate == pytest.approx(0.4)  # round(0.4 * 10000) flipped, each to another class
    assert np.sum(out.labels != y) == 4000
    _intended_rows_ok(out.transition)
    off = out.transition[~np.eye(5, dtype=bool)].reshape(5, 4)
    assert np.allclose(off, 0.1, atol=0.02)  # uniform over the 4 other classes


def test_uniform_includes_true_class_and_matches_its_matrix():
    y = _labels(n_per_class=4000)
    r, k = 0.5, 5
    out = _noise.uniform(y, r, k, np.random.default_rng(0))
    intended = (1 - r) * np.eye(k) + r / k
    _intended_rows_ok(out.transition)
    assert np.abs(out.transition - intended).max() < 0.02
    assert out.rate == pytest.approx(r * (k - 1) / k, abs=0.01)  # below r: some redraws keep the class


def test_pairflip_is_exact_per_class():
    y = _labels(n_per_class=100, k=4)
    out = _noise.pairflip(y, 0.3, 4, np.random.default_rng(3))
    intended = 0.7 * np.eye(4) + 0.3 * np.roll(np.eye(4), 1, axis=1)
    np.testing.assert_allclose(out.transition, intended)
    assert out.rate == pytest.approx(0.3)


def test_cifar10_asym_map_and_matrix():
    assert _noise.CIFAR10_ASYM_MAP == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
    y = _labels(n_per_class=50, k=10)
    out = _noise.class_map_noise(y, 0.4, 10, np.random.default_rng(0), _noise.CIFAR10_ASYM_MAP)
    intended = np.eye(10)
    for s, d in _noise.CIFAR10_ASYM_MAP.items():
        intended[s, s], intended[s, d] = 0.6, 0.4
    np.testing.assert_allclose(out.transition, intended)
    assert out.rate == pytest.approx(0.4 * 5 / 10)


def test_cifar100_map_stays_in_superclass_and_cycles():
    rng = np.random.default_rng(0)
    coarse = rng.permutation(np.repeat(np.arange(20), 5))  # 20 superclasses of 5 fine classes
    m = _noise.cifar100_asym_map(coarse)
    assert sorted(m) == list(range(100)) and sorted(m.values()) == list(range(100))  # a permutation
    for s, d in m.items():
        assert coarse[s] == coarse[d] and s != d
    for sup in range(20):  # following the map from a class visits its whole superclass, then returns
        start = int(np.flatnonzero(coarse == sup)[0])
        seen, c = [start], m[start]
        while c != start:
            seen.append(c)
            c = m[c]
        assert sorted(seen) == sorted(np.flatnonzero(coarse == sup).tolist())


def test_instance_noise_rate_depends_on_images_and_is_seeded():
    y = _labels(n_per_class=600, k=5)
    feats = np.random.default_rng(5).standard_normal((len(y), 16))
    a = _noise.instance(y, 0.3, 5, np.random.default_rng(0), feats)
    b = _noise.instance(y, 0.3, 5, np.random.default_rng(0), feats)
    c = _noise.instance(y, 0.3, 5, np.random.default_rng(0), -feats)
    assert a.rate == pytest.approx(0.3, abs=0.03)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)  # where a label goes depends on the image
    _intended_rows_ok(a.transition)
    assert np.all(np.diag(a.transition) > 0.5)


@pytest.mark.parametrize("noise", ["sym", "uniform", "asym", "pairflip", "instance", "none"])
def test_make_noise_is_reproducible_from_the_seed(noise):
    y = _labels(n_per_class=40, k=10)
    data = _data(y, name="cifar10")
    cfg = make_config({"noise": noise, "noise_rate": None if noise == "none" else 0.4})
    pool = np.arange(0, len(y), 2)
    a = _noise.make_noise(cfg, data, pool, np.random.default_rng(7))
    b = _noise.make_noise(cfg, data, pool, np.random.default_rng(7))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a.labels) == len(pool)
    _intended_rows_ok(a.transition)
    if noise != "none":
        d = _noise.make_noise(cfg, data, pool, np.random.default_rng(8))
        assert not np.array_equal(a.labels, d.labels)


def test_unknown_noise_model_names_choices():
    with pytest.raises(L2BError, match="pairflip"):
        _noise.make_noise(make_config({"noise": "pairflp"}), _data(_labels()), np.arange(10), np.random.default_rng(0))


def test_asym_without_a_map_asks_for_one():
    with pytest.raises(L2BError, match="--noise-map"):
        _noise.make_noise(make_config({"noise": "asym"}), _data(_labels()), np.arange(10), np.random.default_rng(0))


def test_user_class_map_by_name_and_index(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("c0: c1\n3: 4\n")
    data = _data(_labels())
    cfg = make_config({"noise": "asym", "noise_map": str(path), "noise_rate": 0.5})
    out = _noise.make_noise(cfg, data, np.arange(len(data.y_train)), np.random.default_rng(0))
    assert out.transition[0, 1] == pytest.approx(0.5) and out.transition[3, 4] == pytest.approx(0.5)
    assert out.transition[1, 1] == 1.0


def test_class_map_json_list_must_be_a_permutation(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps([1, 2, 0, 3, 4]))
    bad.write_text(json.dumps([1, 1, 0, 3, 4]))
    classes = [f"c{i}" for i in range(5)]
    assert _noise.load_class_map(good, classes) == {0: 1, 1: 2, 2: 0}
    with pytest.raises(L2BError, match=r"bad\.json.*permutation"):
        _noise.load_class_map(bad, classes)


@pytest.mark.parametrize("text,match", [("0: 7\n", "class 7 does not exist"), ("c0: nope\n", "unknown class"),
                                        ("2: 2\n", "maps to itself"), ("[0, 1\n", "not valid YAML")])
def test_class_map_bad_entries(tmp_path, text, match):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(L2BError, match=match) as err:
        _noise.load_class_map(path, [f"c{i}" for i in range(5)])
    assert "m.yaml" in str(err.value)


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".txt"])
def test_label_file_formats(tmp_path, suffix):
    y = _labels(n_per_class=3, k=4)
    noisy = (y + 1) % 4
    path = tmp_path / f"noisy{suffix}"
    if suffix == ".npy":
        np.save(path, noisy)
    elif suffix == ".csv":
        path.write_text("index,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(noisy)))
    else:
        path.write_text("\n".join(str(v) for v in noisy) + "\n")
    data = _data(y)
    cfg = make_config({"noise": f"file:{path}"})
    pool = np.array([0, 3, 5])
    out = _noise.make_noise(cfg, data, pool, np.random.default_rng(0))
    np.testing.assert_array_equal(out.labels, noisy[pool])
    assert out.rate == 1.0


def test_label_file_of_wrong_length(tmp_path):
    y = _labels(n_per_class=3, k=4)
    path = tmp_path / "short.npy"
    np.save(path, y[:-1])
    with pytest.raises(L2BError, match=r"short\.npy: 11 noisy labels, but the training set has 12"):
        _noise.make_noise(make_config({"noise": f"file:{path}"}), _data(y), np.arange(3), np.random.default_rng(0))


@pytest.mark.parametrize("bad", [-1, 4])
def test_label_file_out_of_range(tmp_path, bad):
    y = _labels(n_per_class=3, k=4)
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(str(v) for v in [bad] + list(y[1:])))
    with pytest.raises(L2BError, match=r"labels\.txt: label -?\d+ \(entry 0\) is out of range"):
        _noise.load_label_file(path, len(y), [f"c{i}" for i in range(4)])
