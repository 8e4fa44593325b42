import copy

import pytest
import torch
import torch.nn.functional as F

import l2b
from l2b import create_model, meta_weights
from l2b.meta import META_LOSSES, PSEUDO_SOURCES
from l2b.reference import reference_meta_weights


def _problem(dtype=torch.float64, seed=0, n=12, m=10):
    torch.manual_seed(seed)
    model = create_model("small-cnn", num_classes=4, in_channels=2, width=4).to(dtype)
    x = torch.randn(n, 2, 8, 8, dtype=dtype)
    y = torch.randint(0, 4, (n,))
    xv = torch.randn(m, 2, 8, 8, dtype=dtype)
    yv = torch.randint(0, 4, (m,))
    return model, x, y, xv, yv


def _optimizer(model, kind, x, y):
    if kind is None:
        return None
    kw = {
        "plain": dict(lr=0.1),
        "momentum_wd": dict(lr=0.1, momentum=0.9, weight_decay=5e-3),
        "nesterov": dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
        "dampening": dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3),
    }[kind]
    opt = torch.optim.SGD(model.parameters(), **kw)
    # two real steps so momentum buffers exist and differ from the gradient
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("opt_kind", [None, "plain", "momentum_wd", "nesterov", "dampening"])
@pytest.mark.parametrize("mode", l2b.MODES)
@pytest.mark.parametrize("normalize", l2b.NORMALIZATIONS)
def test_fast_weights_equal_double_backward_oracle(opt_kind, mode, normalize):
    model, x, y, xv, yv = _problem()
    opt = _optimizer(model, opt_kind, x, y)
    fast = meta_weights(model, x, y, xv, yv, optimizer=opt, mode=mode, normalize=normalize, temperature=0.01)
    ref = reference_meta_weights(model, x, y, xv, yv, optimizer=opt, mode=mode, normalize=normalize, temperature=0.01)
    for got, want in zip((fast.alpha, fast.beta, fast.pseudo, fast.raw_alpha, fast.raw_beta), ref):
        scale = want.abs().max().clamp_min(1e-30) if want.is_floating_point() else 1
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(scale)), (got, want)


def test_first_momentum_step_matches_oracle():
    # no momentum buffer yet: torch's SGD sets buf = d on the first step
    model, x, y, xv, yv = _problem(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    fast = meta_weights(model, x, y, xv, yv, optimizer=opt)
    ref = reference_meta_weights(model, x, y, xv, yv, optimizer=opt)
    assert torch.allclose(fast.raw_alpha, ref[3], rtol=1e-6, atol=1e-12)
    assert torch.allclose(fast.raw_beta, ref[4], rtol=1e-6, atol=1e-12)


def test_lookahead_point_matters():
    # the clean gradient is taken at theta' (momentum + weight decay), not at theta
    model, x, y, xv, yv = _problem(seed=1)
    opt = _optimizer(model, "momentum_wd", x, y)
    with_state = meta_weights(model, x, y, xv, yv, optimizer=opt).raw_alpha
    fresh = torch.optim.SGD(model.parameters(), lr=0.1)
    without = meta_weights(model, x, y, xv, yv, optimizer=fresh).raw_alpha
    assert not torch.allclose(with_state, without, rtol=1e-2)


def test_nothing_is_mutated():
    model, x, y, xv, yv = _problem(dtype=torch.float32)
    opt = _optimizer(model, "momentum_wd", x, y)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    meta_weights(model, x, y, xv, yv, optimizer=opt)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = opt.state_dict()
    for k, st in opt_before["state"].items():
        assert torch.equal(st["momentum_buffer"], after["state"][k]["momentum_buffer"])


def test_one_l2b_step_moves_batchnorm_stats_like_one_plain_step():
    model, x, y, xv, yv = _problem(dtype=torch.float32)
    plain = copy.deepcopy(model)
    plain.train()
    model.train()
    plain(x)  # a plain step's forward: one running-stat update
    w = meta_weights(model, x, y, xv, yv)
    logits = model(x)  # the real step's forward
    loss = (w.alpha * F.cross_entropy(logits, y, reduction="none")).sum()
    loss.backward()
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        if "running" in k or "num_batches" in k:
            assert torch.equal(a, b), k


def test_sum_normalisation_nonnegative_and_sums_to_one():
    model, x, y, xv, yv = _problem()
    w = meta_weights(model, x, y, xv, yv)
    assert (w.alpha >= 0).all() and (w.beta >= 0).all()
    assert torch.isclose(w.alpha.sum() + w.beta.sum(), torch.tensor(1.0, dtype=w.alpha.dtype))


def test_all_zero_weights_stay_zero_not_nan():
    raw = -torch.ones(5)
    a, b = l2b.normalize_weights(raw, raw, mode="l2b", normalize="sum")
    assert torch.equal(a, torch.zeros(5)) and torch.equal(b, torch.zeros(5))
    a, b = l2b.normalize_weights(raw, raw, mode="convex", normalize="sum")
    assert torch.allclose(a + b, torch.ones(5))


def test_modes_zero_the_right_term_and_convex_sums_per_sample():
    model, x, y, xv, yv = _problem()
    assert torch.equal(meta_weights(model, x, y, xv, yv, mode="beta0").beta, torch.zeros(len(y), dtype=torch.float64))
    assert torch.equal(meta_weights(model, x, y, xv, yv, mode="alpha0").alpha, torch.zeros(len(y), dtype=torch.float64))
    w = meta_weights(model, x, y, xv, yv, mode="convex", normalize="softmax")
    assert torch.allclose(w.alpha + w.beta, torch.ones(len(y), dtype=torch.float64))


def test_raw_weights_are_lr_times_inner_products_of_per_sample_gradients():
    # Appendix B.2, eq. 23/28: explicit per-sample gradients, a plain SGD look-ahead
    model, x, y, xv, yv = _problem(seed=5)
    model.eval()  # no BatchNorm coupling: per-sample gradients are well defined one by one
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = True
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = list(model.parameters())

    class Frozen(torch.nn.Module):  # the same network with BatchNorm in eval mode always
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inp):
            self.net.eval()
            return self.net(inp)

    frozen = Frozen(model)
    w = meta_weights(frozen, x, y, xv, yv, optimizer=opt)
    gv = torch.autograd.grad(F.cross_entropy(frozen(xv), yv), params)
    for i in range(len(y)):
        logits = frozen(x[i : i + 1])
        gi = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), params)
        expect = lr * sum((a * b).sum() for a, b in zip(gv, gi))
        assert torch.isclose(w.raw_alpha[i], expect, rtol=1e-8)


def test_bad_mode_names_choices():
    model, x, y, xv, yv = _problem()
    with pytest.raises(l2b.L2BError, match="l2b"):
        meta_weights(model, x, y, xv, yv, mode="nope")


def test_weighted_forward_equals_meta_weights_then_real_step():
    # the trainer's fused pass: same weights, same gradients, same BatchNorm statistics
    from l2b.meta import weighted_forward

    model, x, y, xv, yv = _problem(seed=7)
    opt = _optimizer(model, "nesterov", x, y)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), **{k: v for k, v in opt.defaults.items() if k != "params"})
    twin_opt.load_state_dict(opt.state_dict())
    model.train(), twin.train()
    model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
    w, logits = weighted_forward(model, x, y, xv, yv, optimizer=opt, mode="l2b")
    ref = meta_weights(twin, x, y, xv, yv, optimizer=twin_opt)
    twin_logits = twin(x)
    for a, b in ((w.alpha, ref.alpha), (w.beta, ref.beta), (w.raw_alpha, ref.raw_alpha)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-15)
    for net, lg, ww in ((model, logits, w), (twin, twin_logits, ref)):
        (ww.alpha * F.cross_entropy(lg, y, reduction="none") + ww.beta * F.cross_entropy(lg, ww.pseudo, reduction="none")).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-15)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("opt_kind", [None, "momentum_wd"])
def test_finite_difference_weights_approximate_exact_ones(opt_kind):
    model, x, y, xv, yv = _problem(n=32, m=16)
    opt = _optimizer(model, opt_kind, x, y)
    exact = meta_weights(model, x, y, xv, yv, optimizer=opt)
    fd = meta_weights(model, x, y, xv, yv, optimizer=opt, meta_grad="fd")
    for a, b in ((exact.raw_alpha, fd.raw_alpha), (exact.raw_beta, fd.raw_beta)):
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
        assert not torch.equal(a, b)  # an approximation, not the JVP under another name
    assert torch.equal(exact.pseudo, fd.pseudo)


def test_finite_difference_can_reuse_the_real_forward():
    model, x, y, xv, yv = _problem(n=16)
    with torch.no_grad():
        logits = model(x)  # train mode: the real step's forward (it also moves running stats)
    own = meta_weights(model, x, y, xv, yv, meta_grad="fd")
    reused = meta_weights(model, x, y, xv, yv, meta_grad="fd", logits=logits)
    assert torch.allclose(own.raw_alpha, reused.raw_alpha, rtol=1e-9, atol=1e-12)


def test_exact_weights_run_under_autocast():
    model, x, y, xv, yv = _problem(dtype=torch.float32, n=32)
    full = meta_weights(model, x, y, xv, yv).raw_alpha
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = meta_weights(model, x, y, xv, yv).raw_alpha
    assert torch.corrcoef(torch.stack([full, half.float()]))[0, 1] > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_favour_clean_over_flipped_samples_on_a_controlled_problem(seed):
    # three Gaussian classes in 10-D, 30% of the training labels flipped; after a short CE warm-up the
    # observed-label weights of flipped samples must be lower than those of clean ones, and their
    # pseudo-label weights higher (the model's own label is the better target for them)
    g = torch.Generator().manual_seed(seed)
    k, d, n, m = 3, 10, 240, 90
    centers = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y_true = torch.arange(n) % k
    x = centers[y_true] + torch.randn(n, d, generator=g, dtype=torch.float64)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[: int(0.3 * n)]] = True
    y = torch.where(flipped, (y_true + 1 + torch.randint(0, k - 1, (n,), generator=g)) % k, y_true)
    yv = torch.arange(m) % k
    xv = centers[yv] + torch.randn(m, d, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = create_model("mlp", num_classes=k, in_features=d, hidden=32).to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(30):  # warm-up: CE on the noisy labels, not long enough to memorise them
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    w = meta_weights(model, x, y, xv, yv, optimizer=opt)
    assert w.alpha[flipped].mean() < 0.5 * w.alpha[~flipped].mean()
    assert w.beta[flipped].mean() > w.alpha[flipped].mean()
    l2rw = meta_weights(model, x, y, xv, yv, optimizer=opt, mode="beta0")
    assert l2rw.alpha[flipped].mean() < 0.5 * l2rw.alpha[~flipped].mean()


def test_sigmoid_normalisation_is_eq13_and_exact_where_sigmoid_underflows():
    g = torch.Generator().manual_seed(0)
    ra, rb = torch.randn(6, generator=g, dtype=torch.float64) * 3, torch.randn(6, generator=g, dtype=torch.float64) * 3
    a, b = l2b.normalize_weights(ra, rb, mode="l2b", normalize="sigmoid")
    s = torch.sigmoid(torch.cat([ra, rb]))  # eq. 13, literally
    assert torch.allclose(torch.cat([a, b]), s / s.sum(), rtol=1e-12, atol=0)
    a, b = l2b.normalize_weights(ra, rb, mode="convex", normalize="sigmoid")
    pair = torch.sigmoid(torch.stack([ra, rb], 1))
    assert torch.allclose(torch.stack([a, b], 1), pair / pair.sum(1, keepdim=True), rtol=1e-12, atol=0)
    # far below zero every sigmoid is 0 in float64, but sigmoid(r) ~ exp(r): the ratio is softmax(r)
    far = torch.tensor([-800.0, -801.0, -803.0], dtype=torch.float64)
    assert torch.sigmoid(far).sum() == 0
    a, _ = l2b.normalize_weights(far, far, mode="beta0", normalize="sigmoid")
    assert torch.allclose(a, torch.softmax(far, 0), rtol=1e-12, atol=0)


# ---------------------------------------------------------------- --meta-loss, --pseudo-from

def _distinct_running_stats(model, seed=11):
    """BatchNorm running statistics far from any batch's: eval-mode predictions differ from train mode."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(2.0 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.2 + 3.0 * torch.rand(mod.running_var.shape, generator=g))
    return model


@pytest.mark.parametrize("mode", ["l2b", "convex"])
@pytest.mark.parametrize("normalize", l2b.NORMALIZATIONS)
@pytest.mark.parametrize("meta_loss", META_LOSSES)
@pytest.mark.parametrize("pseudo_from", PSEUDO_SOURCES)
@pytest.mark.parametrize("meta_grad", ["exact", "fused"])
def test_meta_loss_and_pseudo_source_equal_the_oracle(mode, normalize, meta_loss, pseudo_from, meta_grad):
    from l2b.meta import weighted_forward

    model, x, y, xv, yv = _problem(seed=4)
    _distinct_running_stats(model)
    opt = _optimizer(model, "momentum_wd", x, y)
    options = dict(optimizer=opt, mode=mode, normalize=normalize, meta_loss=meta_loss, pseudo_from=pseudo_from)
    if meta_grad == "fused":  # the trainer's pass: weights and the real forward's logits at once
        fast, _ = weighted_forward(model, x, y, xv, yv, temperature=0.5, **options)
    else:
        fast = meta_weights(model, x, y, xv, yv, temperature=0.5, **options)
    ref = reference_meta_weights(model, x, y, xv, yv, temperature=0.5, **options)
    if pseudo_from == "eval":  # the two sources disagree on this batch, so the check can tell them apart
        assert not torch.equal(ref[2], reference_meta_weights(model, x, y, xv, yv, optimizer=opt)[2])
    for got, want in zip((fast.alpha, fast.beta, fast.pseudo, fast.raw_alpha, fast.raw_beta), ref):
        scale = want.abs().max().clamp_min(1e-30) if want.is_floating_point() else 1
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(scale)), (got, want)


def test_summed_clean_loss_scales_raw_weights_by_m_which_only_sum_normalisation_cancels():
    # eq. 7 sums G over the m clean images, Algorithm 1 averages: raw weights differ by exactly m
    model, x, y, xv, yv = _problem(seed=2, m=10)
    opt = _optimizer(model, "momentum_wd", x, y)
    mean = meta_weights(model, x, y, xv, yv, optimizer=opt, meta_loss="mean")
    total = meta_weights(model, x, y, xv, yv, optimizer=opt, meta_loss="sum")
    m = len(yv)
    for a, b in ((total.raw_alpha, mean.raw_alpha), (total.raw_beta, mean.raw_beta)):
        assert torch.allclose(a, m * b, rtol=1e-10, atol=1e-15 * float(b.abs().max()))
    assert torch.allclose(total.alpha, mean.alpha, rtol=1e-10, atol=1e-15)  # sum normalisation: m cancels
    assert torch.allclose(total.beta, mean.beta, rtol=1e-10, atol=1e-15)
    for normalize in ("softmax", "sigmoid"):  # ... but not here: the sum's weights are more peaked
        kw = dict(optimizer=opt, normalize=normalize, temperature=1e-3)
        w_mean = meta_weights(model, x, y, xv, yv, meta_loss="mean", **kw)
        w_sum = meta_weights(model, x, y, xv, yv, meta_loss="sum", **kw)
        spread = lambda w: float(torch.cat([w.alpha, w.beta]).max() / torch.cat([w.alpha, w.beta]).min())  # noqa: E731
        assert spread(w_sum) > 1.5 * spread(w_mean), normalize


def test_eval_pseudo_labels_follow_running_statistics_and_move_none():
    model, x, y, xv, yv = _problem(seed=6, n=32)
    _distinct_running_stats(model)
    model.train()
    with torch.no_grad():
        train_pred = copy.deepcopy(model).train()(x).argmax(1)  # on a copy: this forward moves its stats
        eval_pred = copy.deepcopy(model).eval()(x).argmax(1)
    assert (train_pred != eval_pred).any()  # the two modes disagree on this batch: the test can tell them apart
    before = copy.deepcopy(model.state_dict())
    assert torch.equal(meta_weights(model, x, y, xv, yv, pseudo_from="train").pseudo, train_pred)
    w = meta_weights(model, x, y, xv, yv, pseudo_from="eval")
    assert torch.equal(w.pseudo, eval_pred)
    assert model.training and all(mod.training for mod in model.modules())  # modes restored
    for k, v in model.state_dict().items():  # no running statistic moved
        assert torch.equal(v, before[k]), k


def test_fused_step_with_eval_pseudo_labels_moves_batchnorm_stats_like_one_plain_step():
    from l2b.meta import weighted_forward

    model, x, y, xv, yv = _problem(seed=8, n=32, dtype=torch.float32)
    _distinct_running_stats(model)
    plain = copy.deepcopy(model).train()
    model.train()
    with torch.no_grad():
        eval_pred = copy.deepcopy(model).eval()(x).argmax(1)
        plain_logits = plain(x)  # one plain step's forward: one running-stat update
    w, logits = weighted_forward(model, x, y, xv, yv, pseudo_from="eval")
    assert torch.equal(w.pseudo, eval_pred) and not torch.equal(w.pseudo, logits.detach().argmax(1))
    assert torch.allclose(logits.detach(), plain_logits, rtol=1e-5, atol=1e-6)  # g_i's logits: train mode
    for (k, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
