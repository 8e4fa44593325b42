"""The recipe options in the trainer (--val-batch-size 0, --pseudo-from, --meta-loss through a method)
and the per-epoch AUROC of the weights for flipped vs clean samples (metrics.jsonl, fig4_auroc)."""

import json
import signal

import numpy as np
import pytest
import torch

from l2b import make_config, train
from l2b.errors import Interrupted
from l2b.meta import meta_weights
from l2b.methods import StepContext, create_method
from l2b.train import loop as loop_module
from l2b.train.checkpoint import safe_load
from l2b.scores import auroc
from l2b.train.outputs import AUROC_SCORES, weight_aurocs
from l2b.train.setup import start_run
from l2b.train.state import LoopState
from test_labels import _image_data
from test_meta import _distinct_running_stats, _optimizer, _problem

SMALL = dict(subset=180, val_size=60, batch_size=30, val_batch_size=20, epochs=3, warmup_epochs=1, noise="sym",
             noise_rate=0.4, eval_batch_size=200, device="cpu")


# ---------------------------------------------------------------- AUROC

def test_rank_fallback_equals_sklearn_with_ties():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            continue
        assert auroc(scores, positive, use_sklearn=False) == pytest.approx(auroc(scores, positive), abs=1e-12)


def test_auroc_direction_ties_and_empty_classes():
    positive = np.array([False, False, True, True])
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), positive, use_sklearn=False) == 1.0  # flipped score higher
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), positive, use_sklearn=False) == 0.0
    assert auroc(np.ones(4), positive, use_sklearn=False) == 0.5
    assert auroc(np.array([0.1, 0.5, 0.5, 0.9]), positive, use_sklearn=False) == pytest.approx(0.875)
    assert auroc(np.ones(3), np.zeros(3, bool)) is None


def test_weight_aurocs_average_over_steps_and_leave_out_unseen_samples():
    st = LoopState()
    flipped = torch.tensor([False, False, True, True, True])
    # sample 4 is never seen; sample 0 twice in one batch (index_add counts both)
    st.add_epoch_weights(5, torch.tensor([0, 0, 1, 2]), torch.tensor([0.3, 0.1, 0.2, 0.05]), torch.tensor([0.0, 0.0, 0.1, 0.4]))
    st.add_epoch_weights(5, torch.tensor([1, 2, 3]), torch.tensor([0.3, 0.0, 0.1]), torch.tensor([0.1, 0.6, 0.3]))
    assert st.epoch_weights[2].tolist() == [2, 2, 2, 1, 0]
    assert st.epoch_weights[0, 0].item() == pytest.approx((0.3 + 0.1) * 4)  # weights x the batch size
    got = weight_aurocs(st.epoch_weights, flipped)
    a = (st.epoch_weights[0] / st.epoch_weights[2])[:4].numpy()
    b = (st.epoch_weights[1] / st.epoch_weights[2])[:4].numpy()
    pos = flipped[:4].numpy()
    assert got == {"auroc_alpha": auroc(a, pos), "auroc_beta": auroc(b, pos), "auroc_alpha_plus_beta": auroc(a + b, pos),
                   "auroc_beta_minus_alpha": auroc(b - a, pos)}
    assert got["auroc_alpha"] < 0.5 < got["auroc_beta_minus_alpha"]
    assert weight_aurocs(None, flipped) == dict.fromkeys(AUROC_SCORES)
    st.next_epoch()
    assert st.epoch_weights is None  # an epoch's own sums


class _StopAfter:
    """Stands in for the trainer's signal handler: a SIGINT 'arrives' after ``steps`` steps."""

    def __init__(self, steps):
        self.steps = steps

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def received(self):  # read once per step
        self.steps -= 1
        return signal.SIGINT if self.steps < 0 else None


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("auroc") / "full"
    train(make_config(dict(SMALL, keep_checkpoints=5, out=str(out))), progress=False, data=_image_data())
    return out


def _lines(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _records_auroc(records, flipped, minus=None):
    """AUROC of the mean weights from SampleRecords sums (optionally minus an earlier checkpoint's)."""
    sums = torch.stack([records["alpha_sum"], records["beta_sum"], records["count"].double()])
    if minus is not None:
        sums = sums - torch.stack([minus["alpha_sum"], minus["beta_sum"], minus["count"].double()])
    return weight_aurocs(sums, flipped)


def test_metrics_report_each_epochs_own_auroc(full_run):
    lines = _lines(full_run)
    assert "auroc_alpha" not in lines[0]  # the warm-up epoch has no meta-weights
    flipped = torch.as_tensor(np.load(full_run / "true_labels.npy") != np.load(full_run / "noisy_labels.npy"))
    after_2, after_3 = (safe_load(full_run / f"checkpoint-epoch000{e}.pt")["records"] for e in (2, 3))
    # the first meta epoch: the run's records hold exactly its steps
    for key, value in _records_auroc(after_2, flipped).items():
        assert lines[1][key] == pytest.approx(value, abs=1e-9) and 0 <= value <= 1, key
    # the second: its own steps (records at the end minus at its start), not the whole run's
    own, cumulative = _records_auroc(after_3, flipped, minus=after_2), _records_auroc(after_3, flipped)
    for key in AUROC_SCORES:
        assert lines[2][key] == pytest.approx(own[key], abs=1e-3), key
    assert any(abs(own[k] - cumulative[k]) > 1e-3 for k in AUROC_SCORES)  # the check can tell them apart


def test_interrupted_mid_epoch_then_resumed_reports_identical_aurocs(full_run, tmp_path, monkeypatch):
    part = tmp_path / "part"
    monkeypatch.setattr(loop_module, "_StopSignals", lambda: _StopAfter(6 + 6 + 2))  # inside epoch 3
    with pytest.raises(Interrupted):
        train(make_config(dict(SMALL, out=str(part))), progress=False, data=_image_data())
    assert safe_load(part / "checkpoint.pt")["position"]["epoch_weights"] is not None  # a partial epoch's sums
    monkeypatch.setattr(loop_module, "_StopSignals", lambda: _StopAfter(10 ** 9))
    train(None, resume=part, progress=False, data=_image_data())
    strip = lambda ls: [{k: v for k, v in m.items() if k != "seconds"} for m in ls]  # noqa: E731
    assert strip(_lines(part)) == strip(_lines(full_run))
    assert all(m["auroc_alpha"] is not None for m in _lines(part)[1:])


# ---------------------------------------------------------------- the recipe options in the trainer

def test_val_batch_size_zero_draws_clean_batches_of_the_training_batch_size(tmp_path):
    run = start_run(make_config(dict(SMALL, val_batch_size=0, out=str(tmp_path / "r"))), None, _image_data(), None)
    assert [len(run.next_clean()[1]) for _ in range(3)] == [30] * 3
    assert run.cfg.val_batch_size == 0  # the config keeps what the user wrote


@pytest.mark.parametrize("meta_grad", ["exact", "fd"])
def test_l2b_method_reads_pseudo_from_and_meta_loss(meta_grad):
    model, x, y, xv, yv = _problem(seed=6, n=32)
    _distinct_running_stats(model)
    opt = _optimizer(model, "momentum_wd", x, y)
    model.train()
    with torch.no_grad():
        eval_pred = __import__("copy").deepcopy(model).eval()(x).argmax(1)
    expect = meta_weights(model, x, y, xv, yv, optimizer=opt, normalize="softmax", temperature=1e-3, meta_loss="sum",
                          pseudo_from="eval", meta_grad=meta_grad)
    method = create_method("l2b", normalize="softmax", temperature=1e-3, meta_loss="sum", pseudo_from="eval")
    ctx = StepContext(opt, lambda: (xv, yv), 1, 4, meta_grad=meta_grad)
    result = method.step(model, x, y, ctx)
    assert torch.equal(result.pseudo, eval_pred) and not torch.equal(result.pseudo, result.logits.detach().argmax(1))
    assert torch.allclose(result.alpha, expect.alpha, rtol=1e-6, atol=1e-12)
    default = create_method("l2b", normalize="softmax", temperature=1e-3).step(model, x, y, ctx)
    assert not torch.allclose(default.alpha, result.alpha, rtol=1e-3)  # the options change the weights
