"""Property tests (hypothesis): noise generators, weight normalisations, config round-trip."""

import numpy as np
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l2b import normalize_weights
from l2b.data import noise as _noise
from l2b import Config, make_config

GENERATORS = {"sym": _noise.symmetric, "pairflip": _noise.pairflip}
labels_st = st.integers(2, 12).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=1, max_size=400)))


@settings(max_examples=60, deadline=None)
@given(labels_st, st.floats(0.0, 0.95), st.integers(0, 2**32 - 1), st.sampled_from(sorted(GENERATORS)))
def test_noise_hits_its_rate_matrix_rows_sum_to_one_and_is_seeded(k_labels, rate, seed, name):
    k, labels = k_labels
    labels = np.asarray(labels)
    gen = GENERATORS[name]
    out = gen(labels, rate, k, np.random.default_rng(seed))
    assert out.labels.shape == labels.shape and out.labels.min() >= 0 and out.labels.max() < k
    if name == "sym":  # exactly round(rate * N) flips
        expected = round(rate * len(labels))
    else:  # pairflip flips exactly round(rate * N_c) samples in each class c
        expected = sum(round(rate * np.sum(labels == c)) for c in range(k))
    assert abs(out.rate - expected / len(labels)) < 1e-12
    assert np.allclose(out.transition.sum(axis=1), 1.0) and (out.transition >= 0).all()
    assert np.allclose(out.transition, _noise.transition_matrix(labels, out.labels, k))
    again = gen(labels, rate, k, np.random.default_rng(seed))
    assert np.array_equal(out.labels, again.labels)


@settings(max_examples=40, deadline=None)
@given(labels_st, st.floats(0.0, 0.95), st.integers(0, 2**32 - 1))
def test_uniform_noise_never_exceeds_its_rate_and_is_seeded(k_labels, rate, seed):
    k, labels = k_labels
    labels = np.asarray(labels)
    out = _noise.uniform(labels, rate, k, np.random.default_rng(seed))
    assert out.rate <= round(rate * len(labels)) / len(labels) + 1e-12  # a redraw may land on the true class
    assert np.allclose(out.transition.sum(axis=1), 1.0)
    assert np.array_equal(out.labels, _noise.uniform(labels, rate, k, np.random.default_rng(seed)).labels)


raw_st = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=64), min_size=2, max_size=64)


@settings(max_examples=80, deadline=None)
@given(raw_st, st.sampled_from(["l2b", "beta0", "alpha0", "convex"]), st.sampled_from(["sum", "softmax", "sigmoid"]),
       st.floats(0.1, 50.0))
@example(raw=[-710.0, 0.0], mode="beta0", normalize="sigmoid", temperature=1.0)  # every sigmoid underflows to 0
def test_normalisations_are_nonnegative_and_sum_to_one(raw, mode, normalize, temperature):
    raw = torch.tensor(raw, dtype=torch.float64)
    n = len(raw) // 2
    a, b = normalize_weights(raw[:n], raw[n : 2 * n], mode=mode, normalize=normalize, temperature=temperature)
    assert (a >= 0).all() and (b >= 0).all() and torch.isfinite(a).all() and torch.isfinite(b).all()
    if mode == "convex":
        assert torch.allclose(a + b, torch.ones(n, dtype=torch.float64))
        return
    total = float(a.sum() + b.sum())
    any_positive = bool((raw[: 2 * n] > 0).any()) if mode == "l2b" else bool(
        (raw[:n] if mode == "beta0" else raw[n : 2 * n]).gt(0).any())
    if normalize == "sum" and not any_positive:
        assert total == 0.0  # all clamped to zero: the step changes nothing, never NaN
    else:
        assert abs(total - 1.0) < 1e-9


@settings(max_examples=60, deadline=None)
@given(raw_st, st.floats(1e-4, 1e2))
@example(raw=[0.0, 2.2250738585072014e-308], lr=0.5)  # a subnormal total must not be clamped
def test_sum_normalisation_is_invariant_to_the_learning_rate(raw, lr):
    # the raw weights are lr times inner products: under "sum" lr cancels (docs/METHOD.md, "Where l2b follows the published code")
    raw = torch.tensor(raw, dtype=torch.float64)
    n = len(raw) // 2
    a1, b1 = normalize_weights(raw[:n], raw[n : 2 * n], mode="l2b", normalize="sum")
    a2, b2 = normalize_weights(lr * raw[:n], lr * raw[n : 2 * n], mode="l2b", normalize="sum")
    assert torch.allclose(a1, a2, rtol=1e-9, atol=1e-12) and torch.allclose(b1, b2, rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["ce", "l2b", "l2rw", "glc"]),
    "noise_rate": st.floats(0.0, 0.99),
    "epochs": st.integers(1, 500),
    "lr": st.floats(1e-5, 10.0),
    "batch_size": st.integers(1, 4096),
    "grad_clip": st.floats(0.0, 100.0),
    "augment": st.booleans(),
    "subset": st.one_of(st.none(), st.integers(0, 10**6)),
    "normalize": st.sampled_from(["sum", "softmax", "sigmoid"]),
}))
def test_resolved_config_round_trips_through_yaml(values):
    values.setdefault("warmup_epochs", 0)
    cfg = make_config(values)
    again = make_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    assert again == cfg and isinstance(again, Config)
