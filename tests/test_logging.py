"""What a run logs besides its model: the per-epoch record (training accuracy, the memorisation curve,
validation loss), metrics.csv, TensorBoard events, the versions and device, `l2b --version`, and a
sweep's progress lines."""

import csv
import json
import math
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

import l2b
from l2b import make_config
from l2b.cli import main
from l2b.config import load_yaml
from l2b.errors import Interrupted
from l2b.train import loop as loop_module
from l2b.train.outputs import WEIGHT_BIN_EDGES, accumulate_weight_hist, accuracy_counts, train_accuracies
from l2b.train.update import accuracy_and_loss

EPOCH_KEYS = {"epoch", "lr", "train_loss", "train_acc", "train_acc_clean", "train_acc_flipped", "train_memorized",
              "val_loss", "val_acc", "test_acc", "seconds"}
WEIGHT_KEYS = {"alpha_clean", "alpha_flipped", "beta_clean", "beta_flipped"}


def _lines(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _tiny_cfg(tiny_fmnist, out, **kw):
    values = dict(data_dir=str(tiny_fmnist), subset=300, val_size=100, batch_size=32, val_batch_size=20, epochs=3,
                  warmup_epochs=1, eval_batch_size=300, out=str(out))
    return make_config({**values, **kw})


def test_accuracy_counts_match_a_direct_count():
    g = torch.Generator().manual_seed(0)
    pred, y, y_true = (torch.randint(0, 4, (500,), generator=g) for _ in range(3))
    flipped = y != y_true
    c = accuracy_counts(pred, y, flipped, y_true)
    assert c.tolist() == [500, int((pred == y).sum()), int((~flipped).sum()), int(((pred == y) & ~flipped).sum()),
                          int(flipped.sum()), int(((pred == y) & flipped).sum()),
                          int(((pred == y_true) & flipped).sum())]
    acc = train_accuracies(c, truth_known=True)
    corrected = ((pred == y_true) & flipped).sum().item()
    assert acc["train_acc_flipped"] == pytest.approx(100 * corrected / flipped.sum().item())
    # the observed-label accuracy is the clean samples' accuracy and the memorisation, weighted by their counts
    mixed = (acc["train_acc_clean"] * c[2] + acc["train_memorized"] * c[4]) / c[0]
    assert acc["train_acc"] == pytest.approx(mixed.item())
    unknown = accuracy_counts(pred, y, None, None)
    assert unknown[2:].tolist() == [0] * 5 and train_accuracies(unknown, truth_known=False).keys() == {"train_acc"}


class _Images:
    """The interface evaluation reads: len(), .device, .batch(idx)."""

    def __init__(self, x):
        self.x, self.device = x, x.device

    def __len__(self):
        return len(self.x)

    def batch(self, idx, **_):
        return self.x[idx]


def test_validation_loss_is_the_mean_cross_entropy_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    model.train()(torch.randn(64, 6))  # running statistics away from their start
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    acc, loss = accuracy_and_loss(model, _Images(x), y, batch_size=7)  # batches of 7 must not change it
    assert model.training  # the mode is restored
    with torch.no_grad():
        logits = model.eval()(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert acc == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())


def test_weight_histogram_counts_and_moments():
    hist = torch.zeros(2, len(WEIGHT_BIN_EDGES) + 1, dtype=torch.float64)
    moments = torch.tensor([[math.inf, -math.inf, 0.0, 0.0]] * 2, dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.0, 1 / 128, 1 / 64, 125 / 128])  # times n = 5: 0, 0, 0.039, 0.078, 4.88
    beta = torch.full((5,), 3 / 16)  # times 5: 0.9375 each
    accumulate_weight_hist(hist, moments, alpha, beta)
    assert hist[0, 0] == 2 and hist[0, 1] == 2 and hist[0, -1] == 1  # zeros, (0, 0.1], above the last edge
    assert hist[1, 10] == 5 and hist[1].sum() == 5  # (0.9, 1.0]
    w = alpha.double() * 5
    assert moments[0].tolist() == [0.0, w.max().item(), w.sum().item(), (w * w).sum().item()]
    assert moments[1].tolist() == [0.9375, 0.9375, 5 * 0.9375, 5 * 0.9375 ** 2]


def test_epoch_record_csv_tensorboard_and_environment(tmp_path, tiny_args):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--log", "csv,tensorboard", *tiny_args]) == 0
    lines = _lines(run)
    for m in lines:
        assert EPOCH_KEYS <= set(m)
        assert all(0 <= m[k] <= 100 for k in ("train_acc", "train_acc_clean", "train_acc_flipped", "train_memorized"))
        # the observed-label accuracy mixes the clean samples' accuracy and the memorisation of the flipped ones
        lo, hi = sorted((m["train_acc_clean"], m["train_memorized"]))
        assert lo - 1e-9 <= m["train_acc"] <= hi + 1e-9
        assert m["val_loss"] > 0
    assert WEIGHT_KEYS <= set(lines[-1]) and not WEIGHT_KEYS & set(lines[0])  # epoch 1 is warm-up

    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(lines)
    for row, m in zip(rows, lines):
        for key in row:
            assert (row[key] == "") if m.get(key) is None else float(row[key]) == m[key], key

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = {"train/acc": "train_acc", "train/memorized": "train_memorized", "train/acc_flipped": "train_acc_flipped",
            "val/loss": "val_loss", "val/acc": "val_acc", "test/acc": "test_acc", "run/lr": "lr",
            "weights/alpha_flipped": "alpha_flipped"}
    for tag, key in tags.items():
        events = ea.Scalars(tag)
        expect = [(m["epoch"], m[key]) for m in lines if m.get(key) is not None]
        assert [e.step for e in events] == [e for e, _ in expect], tag
        assert [e.value for e in events] == pytest.approx([v for _, v in expect], rel=1e-6), tag
    steps = 300 // 32
    for name in ("alpha", "beta"):
        hists = ea.Histograms(f"weights/{name}")
        assert [h.step for h in hists] == [2, 3]  # the meta epochs only
        for h in hists:
            assert h.histogram_value.num == steps * 32 == sum(h.histogram_value.bucket)

    env = json.loads((run / "run.json").read_text())
    assert env["l2b"] == l2b.__version__ and env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["log"] == ["csv", "tensorboard"]
    header = (run / "config.yaml").read_text().splitlines()[0]
    assert header.startswith(f"# l2b {l2b.__version__}, torch {torch.__version__}, device cpu")
    assert make_config(load_yaml(run / "config.yaml")).log == "csv,tensorboard"  # still a loadable config


def test_interrupted_then_crashed_run_resumes_to_the_same_logs(tmp_path, tiny_fmnist, monkeypatch):
    """A stop mid-epoch (the running totals live in the checkpoint), then a crash after an epoch that had
    no checkpoint (TensorBoard drops its events on resume): the logs of an uninterrupted run."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = dict(subset=200, batch_size=50, epochs=4, checkpoint_every="2", log="csv,tensorboard")  # 4 steps an epoch
    l2b.train(_tiny_cfg(tiny_fmnist, tmp_path / "ref", **kw), progress=False)
    real_step, run = loop_module._step, tmp_path / "run"

    def stopping(at, how):
        def step(r, *args):
            received = real_step(r, *args)
            if r.state.step == at:
                if how == "signal":
                    return signal.SIGINT
                raise RuntimeError("crash")
            return received
        return step

    monkeypatch.setattr(loop_module, "_step", stopping(4 + 2, "signal"))  # in epoch 2
    with pytest.raises(Interrupted):
        l2b.train(_tiny_cfg(tiny_fmnist, run, **kw), progress=False)
    monkeypatch.setattr(loop_module, "_step", stopping(3 * 4 + 2, "crash"))  # in epoch 4; epoch 3 has no checkpoint
    with pytest.raises(RuntimeError):
        l2b.train(None, resume=run, progress=False)
    monkeypatch.setattr(loop_module, "_step", real_step)
    l2b.train(None, resume=run, progress=False)

    without_seconds = lambda lines: [{k: v for k, v in m.items() if k != "seconds"} for m in lines]  # noqa: E731
    assert without_seconds(_lines(run)) == without_seconds(_lines(tmp_path / "ref"))
    with open(run / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    ea, ref = (EventAccumulator(str(d), size_guidance={"scalars": 0, "histograms": 0}) for d in (run, tmp_path / "ref"))
    ea.Reload(), ref.Reload()
    for tag in ("train/acc", "train/memorized", "val/loss", "weights/alpha_clean"):
        assert [(e.step, e.value) for e in ea.Scalars(tag)] == [(e.step, e.value) for e in ref.Scalars(tag)], tag
    for name in ("alpha", "beta"):
        got, want = ([(h.step, list(h.histogram_value.bucket)) for h in acc.Histograms(f"weights/{name}")]
                     for acc in (ea, ref))
        assert got == want, name
    assert [r["at_epoch"] for r in json.loads((run / "run.json").read_text())["resumes"]] == [1, 2]


def test_tensorboard_missing_is_one_line_naming_the_extra(tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--log", "tensorboard", *tiny_args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("l2b: error:") and "pip install 'l2b[tensorboard]'" in err[0]
    assert not run.exists()  # it fails before the run folder is made
    # auto falls back to CSV
    assert main(["train", "--out", str(run), "--epochs", "1", "--warmup-epochs", "0",
                 *[a for a in tiny_args if a not in ("--epochs", "3", "--warmup-epochs", "1")]]) == 0
    assert (run / "metrics.csv").is_file() and not list(run.glob("events.out.tfevents*"))
    assert json.loads((run / "run.json").read_text())["log"] == ["csv"]


@pytest.mark.parametrize("value, expect", [("csv,tb", "log must be a comma list of csv, tensorboard"),
                                           ("none,csv", "auto and none stand alone")])
def test_bad_log_value(value, expect, capsys):
    assert main(["train", "--log", value]) == 2
    assert expect in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"l2b {l2b.__version__} (torch {torch.__version__})"


def test_sweep_prints_a_line_as_each_cell_starts_and_ends(tmp_path, tiny_args, capsys):
    sweep = ["sweep", "--methods", "ce", "--noise-rates", "0.4", "--seeds", "1,2", "--epochs", "1",
             "--warmup-epochs", "0", "--log", "none",
             *[a for a in tiny_args if a not in ("--epochs", "3", "--warmup-epochs", "1")]]
    assert main([*sweep, "--out", str(tmp_path / "s")]) == 0
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("[")]
    assert len(lines) == 4
    assert lines[0].startswith("[1/2] ce-sym-r0.4-s1: started; 2 runs to go") and "about" not in lines[0]
    assert lines[1].startswith("[1/2] ce-sym-r0.4-s1: done in ") and "test accuracy" in lines[1]
    assert lines[1].endswith("; 1 run to go, about " + lines[1].rsplit("about ", 1)[1])
    assert lines[2].startswith("[2/2] ce-sym-r0.4-s2: started; 1 run to go, about ")
    assert lines[3].startswith("[2/2] ce-sym-r0.4-s2: done in ") and "to go" not in lines[3]
    summary = json.loads((tmp_path / "s" / "ce-sym-r0.4-s2" / "summary.json").read_text())
    assert f"{summary['test_acc_last']:.2f}% at the last epoch" in lines[3]
    # run again (other logs do not make other settings): every cell is already finished, one line each
    assert main([*sweep, "--log", "csv", "--out", str(tmp_path / "s")]) == 0
    again = [s for s in capsys.readouterr().out.splitlines() if s.startswith("[")]
    assert [s.split(":")[1].strip().split(",")[0] for s in again] == ["already finished"] * 2
