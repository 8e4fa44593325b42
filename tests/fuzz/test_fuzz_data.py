"""Fuzzing the data a user brings (npz, CSV + image files, image folders), label files and YAML configs.

Each generated case is a valid data set with at most one defect drawn from the classes the issue
lists and others (stray labels in any split, non-uint8 images, empty and truncated files, duplicate
and leaking CSV rows...). A valid case must give exit 0 and the right counts (``l2b data check
--json``, the same loading and checks ``l2b train`` runs first); a defective one exit 2 with one line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.xdist_group("fuzz")  # one worker: one ledger
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NPZ_DEFECTS = ("none", "none", "none", "stray_train_label", "stray_train_label_named", "stray_test_label",
               "stray_val_label", "negative_label", "fractional_labels", "nan_labels", "float_images_0_255",
               "normalised_images", "int_out_of_range", "bool_images", "nan_images", "empty_train", "empty_test",
               "empty_val", "all_empty", "length_mismatch", "missing_key", "half_val", "truncated", "garbage",
               "empty_file", "bad_ndim", "labels_2d", "duplicate_class_names", "class_missing_in_val",
               "shape_mismatch", "object_array", "string_labels", "classes_2d")


def _images(rng, n, dtype_kind, layout):
    x = rng.integers(0, 256, (n, 6, 6, 1) if layout == "NHWC" else (n, 1, 6, 6), dtype=np.uint8)
    if layout == "NHW":
        x = x[:, 0]
    if dtype_kind == "float01":
        return x.astype(np.float32) / 255.0
    if dtype_kind == "int_in_range":
        return x.astype(np.int32)
    return x


@st.composite
def npz_cases(draw, defect=None):
    k = draw(st.integers(2, 4))
    per = draw(st.integers(3, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    layout = draw(st.sampled_from(["NHW", "NHWC", "NCHW"]))
    kind = draw(st.sampled_from(["uint8", "float01", "int_in_range"]))
    give_val = draw(st.booleans())
    defect = defect or draw(st.sampled_from(NPZ_DEFECTS))
    y_train, y_test, y_val = np.repeat(np.arange(k), per), np.repeat(np.arange(k), 2), np.repeat(np.arange(k), 2)
    arrays = {"x_train": _images(rng, len(y_train), kind, layout), "y_train": y_train,
              "x_test": _images(rng, len(y_test), kind, layout), "y_test": y_test}
    if give_val or defect in ("stray_val_label", "empty_val", "class_missing_in_val"):
        arrays.update(x_val=_images(rng, len(y_val), kind, layout), y_val=y_val)
    a = arrays
    if defect == "stray_train_label":
        a["y_train"] = a["y_train"].copy()
        a["y_train"][draw(st.integers(0, len(y_train) - 1))] = k + draw(st.integers(0, 3))
    elif defect == "stray_train_label_named":
        a["y_train"] = a["y_train"].copy()
        a["y_train"][0] = k
        a["classes"] = np.array([f"c{i}" for i in range(k)])
    elif defect == "stray_test_label":
        a["y_test"] = a["y_test"].copy()
        a["y_test"][-1] = k + 1
    elif defect == "stray_val_label":
        a["y_val"] = a["y_val"].copy()
        a["y_val"][0] = k
    elif defect == "negative_label":
        key = draw(st.sampled_from(["y_train", "y_test"]))
        a[key] = np.r_[-1, a[key][1:]]
    elif defect == "fractional_labels":
        a["y_train"] = a["y_train"] + 0.5
    elif defect == "nan_labels":
        a["y_train"] = np.r_[np.nan, a["y_train"][1:].astype(float)]
    elif defect == "float_images_0_255":
        a["x_train"] = _images(rng, len(y_train), "uint8", layout).astype(np.float32)
        a["x_train"].flat[0] = 255.0
    elif defect == "normalised_images":
        a["x_train"] = rng.normal(size=_images(rng, len(y_train), "uint8", layout).shape).astype(np.float32)
    elif defect == "int_out_of_range":
        a["x_train"] = _images(rng, len(y_train), "int_in_range", layout) * 4
        a["x_train"].flat[0] = 1000
    elif defect == "bool_images":
        a["x_train"] = _images(rng, len(y_train), "uint8", layout) > 127
    elif defect == "nan_images":
        a["x_train"] = _images(rng, len(y_train), "float01", layout)
        a["x_train"].flat[3] = np.nan
    elif defect in ("empty_train", "empty_test", "empty_val"):
        s = defect.split("_")[1]
        a[f"x_{s}"], a[f"y_{s}"] = a[f"x_{s}"][:0], a[f"y_{s}"][:0]
    elif defect == "all_empty":
        for key in list(a):
            a[key] = a[key][:0]
    elif defect == "length_mismatch":
        a["y_train"] = a["y_train"][:-1]
    elif defect == "missing_key":
        del a[draw(st.sampled_from(["x_train", "y_train", "x_test", "y_test"]))]
    elif defect == "half_val":
        a["x_val"] = a["x_test"]
        a.pop("y_val", None)
    elif defect == "bad_ndim":
        a["x_train"] = a["x_train"].reshape(len(y_train), 1, 1, -1)[:, :, :, :, None]
    elif defect == "labels_2d":
        a["y_train"] = a["y_train"][:, None]
    elif defect == "duplicate_class_names":
        a["classes"] = np.array(["same"] * k)
    elif defect == "classes_2d":
        a["classes"] = np.array([[f"c{i}" for i in range(k)]])
    elif defect == "class_missing_in_val":
        a["y_val"] = np.maximum(a["y_val"], 1)
    elif defect == "shape_mismatch":
        a["x_test"] = rng.integers(0, 256, (len(y_test), 1, 7, 7), dtype=np.uint8)
    elif defect == "object_array":
        a["y_train"] = np.array([int(v) for v in y_train] + [None], dtype=object)[:-1]
    elif defect == "string_labels":
        a["y_train"] = np.array([f"c{v}" for v in y_train])
    return a, defect, k, len(y_train), give_val and "x_val" in a


def _write_npz(path: Path, arrays: dict, defect: str, seed: int = 0) -> None:
    np.savez(path, **arrays)
    raw = path.read_bytes()
    if defect == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif defect == "garbage":
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif defect == "empty_file":
        path.write_bytes(b"")


def _data_check_oracle(k: int, n_train: int, n_val_given: int, val_size: int, n_test: int | None = None):
    def oracle(stdout: str):
        r = json.loads(stdout)
        want_clean = n_val_given or val_size
        got = (len(r["classes"]), r["num_train"] + (0 if n_val_given else r["num_clean"]), r["num_clean"],
               r["num_test"])
        want = (k, n_train, want_clean, 2 * k if n_test is None else n_test)
        return None if got == want else f"data check counts {got}, expected {want}"
    return oracle


@FUZZ
@given(npz_cases())
def test_npz_data_sets(ledger, case):
    _check_npz(ledger, case)


@pytest.mark.parametrize("defect", sorted(set(NPZ_DEFECTS)))
@settings(FUZZ, max_examples=2)
@given(data=st.data())
def test_every_npz_defect(ledger, defect, data):  # each class at least twice, whatever the draws above hit
    _check_npz(ledger, data.draw(npz_cases(defect=defect)))


def _check_npz(ledger, case):
    arrays, defect, k, n_train, has_val = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        _write_npz(path, arrays, defect)
        val_size = 0 if has_val else k
        ledger.check(["data", "check", "--dataset", f"npz:{path}", "--subset", "0", "--val-size", str(val_size),
                      "--noise", "sym", "--noise-rate", "0.2", "--json"], inputs=[path], expect="ok" if defect == "none" else "error",
                     oracle=_data_check_oracle(k, n_train, 2 * k if has_val else 0, val_size), label=f"npz {defect}")


# ---- CSV listings of image files

CSV_DEFECTS = ("none", "none", "none", "duplicate_row", "two_labels", "test_repeats_train", "val_repeats_train",
               "same_file_other_spelling", "missing_file", "escaping_path", "bad_split", "ragged_row",
               "split_on_some_rows", "corrupt_image", "empty_csv", "header_only", "negative_label", "binary_csv")


def _png(path: Path, value: int) -> None:
    from PIL import Image

    Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(path)


@FUZZ
@given(k=st.integers(2, 3), per=st.integers(3, 4), named=st.booleans(), defect=st.sampled_from(CSV_DEFECTS))
def test_csv_listings(ledger, k, per, named, defect):
    _check_csv(ledger, k, per, named, defect)


@pytest.mark.parametrize("defect", sorted(set(CSV_DEFECTS)))
def test_every_csv_defect(ledger, defect):
    _check_csv(ledger, 2, 3, True, defect)


def _check_csv(ledger, k, per, named, defect):
    pytest.importorskip("PIL")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for split, n in (("train", per), ("val", 2), ("test", 2)):
            for c in range(k):
                for i in range(n):
                    name = f"{split}_{c}_{i}.png"
                    _png(root / name, 40 * c + i)
                    rows.append([name, f"class{c}" if named else str(c), split])
        if defect == "duplicate_row":
            rows.append(list(rows[0]))
        elif defect == "two_labels":
            rows.append([rows[0][0], rows[-1][1], "train"])
        elif defect == "test_repeats_train":
            rows.append([rows[0][0], rows[0][1], "test"])
        elif defect == "val_repeats_train":
            rows.append([rows[1][0], rows[1][1], "val"])
        elif defect == "same_file_other_spelling":
            rows.append(["./" + rows[0][0], rows[0][1], "test"])
        elif defect == "missing_file":
            rows.append(["nothere.png", rows[0][1], "train"])
        elif defect == "escaping_path":
            rows.append(["../outside.png", rows[0][1], "train"])
        elif defect == "bad_split":
            rows[0][2] = "holdout"
        elif defect == "ragged_row":
            rows[0] = rows[0] + ["extra", "cells"]
        elif defect == "split_on_some_rows":
            rows[0] = rows[0][:2]
        elif defect == "corrupt_image":
            (root / rows[0][0]).write_text("not an image")
        elif defect == "negative_label":
            rows = [[r[0], str(int(r[1][-1])), r[2]] for r in rows]
            rows[0][1] = "-1"
        text = "path,label,split\n" + "".join(",".join(r) + "\n" for r in rows)
        if defect == "empty_csv":
            text = ""
        elif defect == "header_only":
            text = "path,label,split\n"
        listing = root / "list.csv"
        if defect == "binary_csv":
            listing.write_bytes(b"\x89PNG\x00\xff\xfe" * 20)
        else:
            listing.write_text(text)
        ledger.check(["data", "check", "--dataset", f"csv:{listing}", "--subset", "0", "--noise", "sym", "--noise-rate", "0.2",
                      "--json"], inputs=[root], expect="ok" if defect == "none" else "error",
                     oracle=_data_check_oracle(k, per * k, 2 * k, 0), label=f"csv {defect}")


# ---- noisy-label files (noise file:PATH)

LABEL_DEFECTS = ("none", "none", "too_short", "too_long", "out_of_range", "negative", "unknown_name", "float_npy",
                 "nan_npy", "bool_npy", "2d_npy", "wrong_suffix", "empty", "garbage_npy")


@FUZZ
@given(defect=st.sampled_from(LABEL_DEFECTS), suffix=st.sampled_from([".npy", ".txt", ".csv"]))
def test_noisy_label_files(ledger, defect, suffix):
    k, per = 3, 4
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        y = np.repeat(np.arange(k), per)
        np.savez(root / "d.npz", x_train=rng.integers(0, 256, (len(y), 6, 6), dtype=np.uint8), y_train=y,
                 x_val=rng.integers(0, 256, (k, 6, 6), dtype=np.uint8), y_val=np.arange(k),
                 x_test=rng.integers(0, 256, (k, 6, 6), dtype=np.uint8), y_test=np.arange(k))
        labels = (y + 1) % k
        if defect == "too_short":
            labels = labels[:-1]
        elif defect == "too_long":
            labels = np.r_[labels, 0]
        elif defect == "out_of_range":
            labels = np.r_[k, labels[1:]]
        elif defect == "negative":
            labels = np.r_[-1, labels[1:]]
        path = root / f"labels{suffix}"
        if suffix == ".npy":
            arr = {"float_npy": labels + 0.25, "nan_npy": np.r_[np.nan, labels[1:]], "bool_npy": labels > 0,
                   "2d_npy": labels[:, None]}.get(defect, labels)
            np.save(path, arr)
        else:
            cells = [str(v) for v in labels] + (["banana"] if defect == "unknown_name" else [])
            if defect == "unknown_name":
                cells = ["banana"] + cells[1:-1]
            path.write_text("label\n" + "\n".join(cells) + "\n" if suffix == ".csv" else "\n".join(cells) + "\n")
        if defect == "wrong_suffix":
            path = path.rename(root / "labels.json")
        elif defect == "empty":
            path.write_bytes(b"")
        elif defect == "garbage_npy":
            path = root / "labels.npy"
            path.write_bytes(b"\x93NUMPY garbage")
        npy_only = ("float_npy", "nan_npy", "bool_npy", "2d_npy")  # defects of an array: text files stay valid
        harmless = (suffix != ".npy" and defect in npy_only) or (suffix == ".npy" and defect == "unknown_name")
        expect = "ok" if defect == "none" or harmless else "error"

        def oracle(stdout):
            r = json.loads(stdout)
            return None if r["noise"] == f"file:{path}" and r["num_train"] == len(y) else f"got {r}"

        ledger.check(["data", "check", "--dataset", f"npz:{root / 'd.npz'}", "--subset", "0", "--noise",
                      f"file:{path}", "--json"], inputs=[root], expect=expect, oracle=oracle,
                     label=f"labels {suffix} {defect}")


# ---- folders of images

FOLDER_DEFECTS = ("none", "unknown_test_class", "corrupt_image", "no_test", "no_images", "empty_val_class")


@pytest.mark.parametrize("defect", FOLDER_DEFECTS)
def test_image_folders(ledger, tmp_path, defect):
    pytest.importorskip("PIL")
    k = 2
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for c in range(k):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n if defect != "no_images" or split != "train" else 0):
                _png(tmp_path / split / f"c{c}" / f"{i}.png", 30 * c + i)
    if defect == "unknown_test_class":
        (tmp_path / "test" / "c9").mkdir()
        _png(tmp_path / "test" / "c9" / "0.png", 1)
    elif defect == "corrupt_image":
        (tmp_path / "train" / "c0" / "0.png").write_bytes(b"\x89PNG broken")
    elif defect == "no_test":
        import shutil

        shutil.rmtree(tmp_path / "test")
    elif defect == "empty_val_class":
        (tmp_path / "val" / "c1" / "0.png").unlink()
    ledger.check(["data", "check", "--dataset", f"folder:{tmp_path}", "--subset", "0", "--noise", "sym", "--noise-rate", "0.2",
                  "--json"], inputs=[tmp_path], expect="ok" if defect == "none" else "error",
                 oracle=_data_check_oracle(k, 3 * k, k, 0, n_test=k), label=f"folder {defect}")


# ---- YAML configs

GOOD = {"epochs": 2, "lr": 0.1, "noise_rate": 0.3, "method": "l2rw", "model": "small-cnn", "normalize": "softmax",
        "checkpoint_every": "3steps", "batch_size": 8, "temperature": 2.0, "noise": "pairflip"}
BAD_VALUES = {"lr": [float("nan"), float("inf"), -1.0, 0, "fast", [0.1], {"a": 1}, True],
              "epochs": [0, -3, 2.5, "ten", None, float("nan")],
              "noise_rate": [1.0, -0.1, float("nan"), "40%"],
              "method": ["l2bb", "", 3, "L2B"], "model": ["resnet", "", None], "normalize": ["max", "Sum"],
              "checkpoint_every": ["0", "2h", "steps", "-1min", "1.5", float("inf")],
              "noise": ["symmetric", "file:", 0.4], "device": ["gpu", "cuda:x", "tpu"], "batch_size": [0, "32"],
              "augment": ["yes", 1],
              "seed": [1.5, "0"], "amp": ["fp8"], "warmup_epochs": [50]}
UNKNOWN_KEYS = ["learning_rate", "num_epochs", "noise_ratio", "arch", "learnig_rate", "epoch", "banana", "LR"]


@st.composite
def yaml_cases(draw):
    values = {k: v for k, v in GOOD.items() if draw(st.booleans())}
    kind = draw(st.sampled_from(["good", "bad_value", "unknown_key", "not_mapping", "bad_yaml", "binary"]))
    if kind == "bad_value":
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        values[key] = draw(st.sampled_from(BAD_VALUES[key]))
    elif kind == "unknown_key":
        values[draw(st.sampled_from(UNKNOWN_KEYS))] = 1
    return values, kind


@FUZZ
@given(yaml_cases())
def test_yaml_configs(ledger, tiny_npz_dir, case):
    import yaml

    values, kind = case
    data = tiny_npz_dir / "d.npz"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        if kind == "not_mapping":
            path.write_text(yaml.safe_dump([values]))
        elif kind == "bad_yaml":
            path.write_text("lr: [0.1\nepochs: {\n")
        elif kind == "binary":
            path.write_bytes(b"\xff\xfe\x00lr\x00")
        else:
            path.write_text(yaml.safe_dump({"noise": "sym", "noise_rate": 0.4, **values}))  # your own data: no noise unless asked

        def oracle(stdout):  # the config's values reached the data pipeline
            r = json.loads(stdout)
            rate = values.get("noise_rate", 0.4)
            return None if r["noise_rate"] == rate else f"noise_rate {r['noise_rate']} != {rate}"

        ledger.check(["data", "check", "--config", str(path), "--dataset", f"npz:{data}", "--subset", "0",
                      "--val-size", "4", "--json"], inputs=[path, data], expect="ok" if kind == "good" else "error",
                     oracle=oracle, label=f"yaml {kind} {sorted(values)}")


@pytest.fixture(scope="session")
def tiny_npz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    y = np.arange(24) % 4
    np.savez(d / "d.npz", x_train=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y_test=np.arange(8) % 4)
    return d
