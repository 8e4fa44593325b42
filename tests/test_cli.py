import json

import pytest

import l2b.data.benchmarks
from l2b.cli import main

SUMMARY_KEYS = {"method", "dataset", "noise", "noise_rate", "noise_rate_actual", "epochs", "seed", "test_acc_last",
                "test_acc_best_val", "best_val_epoch", "test_acc_max", "val_is_train", "train_seconds"}


@pytest.mark.parametrize("method", ["l2b", "ce", "glc"])
def test_train_writes_the_run_folder(tmp_path, tiny_args, method, capsys):
    out = tmp_path / "run"
    extra = ["--stage1-epochs", "1"] if method == "glc" else []
    assert main(["train", "--method", method, "--out", str(out), *tiny_args, *extra]) == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "noise.json", "noisy_labels.npy"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["method"] == method and summary["epochs"] == 3
    assert abs(summary["noise_rate_actual"] - 0.4) < 1e-9  # exactly round(0.4 * 300) flipped
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert {"epoch", "lr", "train_loss", "val_acc", "test_acc", "seconds"} <= set(m)
    meta_keys = {"alpha_clean", "alpha_flipped", "beta_clean", "beta_flipped"}
    if method == "l2b":
        assert meta_keys <= set(lines[-1]) and not meta_keys & set(lines[0])  # epoch 1 is warm-up
    elif method == "ce":
        assert not meta_keys & set(lines[-1])
    assert summary["test_acc_max"] == max(m["test_acc"] for m in lines)
    printed = capsys.readouterr().out
    assert "test accuracy, best clean-val epoch" in printed
    # glc trains on the clean batches it is selected on: its summary and its printout say so, the others' do not
    assert summary["val_is_train"] == (method == "glc")
    assert ("glc trains on the clean set, so this selects nothing" in printed) == (method == "glc")


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l2b: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("argv, expect", [
    (["train", "--method", "l2bb"], "unknown method 'l2bb' (did you mean 'l2b'?)"),
    (["train", "--noise-rate", "1.0"], "noise_rate must be in [0.0, 1.0)"),
    (["train", "--noise-rate", "-0.1"], "noise_rate must be in"),
    (["train", "--lr", "0"], "lr must be in"),
    (["train", "--batch-size", "0"], "batch_size must be in"),
    (["train", "--noise", "weird"], "noise must be one of"),
    (["train", "--epochs", "two"], "--epochs must be an integer, got 'two'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expect, capsys, tiny_args, tmp_path):
    extra = [] if "--epochs" in argv else ["--out", str(tmp_path / "r")]
    assert main([*argv, *extra]) == 2
    assert expect in _one_error_line(capsys)


def test_missing_data_without_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(l2b.data.benchmarks, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(l2b.data.benchmarks, "FASHION_MNIST_URL", "http://127.0.0.1:9/")  # refused at once
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("L2B_DATA", raising=False)
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert "Fashion-MNIST not found" in line and "dataset-fashion-mnist" in line and "--data-dir" in line


def test_existing_output_folder_is_never_touched(tmp_path, tiny_args, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["train", "--out", str(out), *tiny_args]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_config_file_and_flag_override(tmp_path, tiny_args):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: ce\nnoise_rate: 0.2\nepochs: 2\nbatch_size: 50\n")
    i = tiny_args.index("--epochs")
    args = tiny_args[:i] + tiny_args[i + 2:]
    args = [a for a in args if a not in ("--batch-size", "32")]
    out = tmp_path / "r"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out), *args]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["method"], saved["noise_rate"], saved["epochs"], saved["batch_size"]) == ("ce", 0.2, 1, 50)


def test_config_unknown_key_suggests(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("noise_rat: 0.2\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key 'noise_rat' (did you mean 'noise_rate'?)" in _one_error_line(capsys)


def test_config_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: ten\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "'epochs' must be an integer" in _one_error_line(capsys)
