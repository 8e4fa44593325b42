"""Properties of the baselines (l2b.methods.simple, l2b.methods.metanet) that could fail."""

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from l2b import create_model
from l2b.methods.metanet import MWNet, LabelCorrectionNet, WeightNet, mlc_meta_grad, mwnet_meta_grad
from l2b.methods.simple import GLC, Distill, bootstrap_loss, estimate_corruption
from l2b import Config, L2BError
from l2b.data import DeviceImages
from l2b.meta import lookahead_affine, meta_mode
from l2b.methods import PrepareContext, StepContext, create_method
from l2b.train import fit_ce


@pytest.fixture(autouse=True)
def _one_thread():
    # these problems are tiny: thread start-up and contention would dominate their run time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(seed=0, n=12, m=10, k=4):
    torch.manual_seed(seed)
    model = create_model("small-cnn", num_classes=k, in_channels=2, width=4).double()
    x, y = torch.randn(n, 2, 8, 8, dtype=torch.float64), torch.randint(0, k, (n,))
    xv, yv = torch.randn(m, 2, 8, 8, dtype=torch.float64), torch.randint(0, k, (m,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    for _ in range(2):  # momentum buffers exist and differ from the gradient
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, xv, yv, opt


def _ctx(opt, x_val=None, y_val=None, k=4):
    return StepContext(opt, lambda: (x_val, y_val), epoch=5, num_classes=k)


def _value_and_grads(method, model, x, y, ctx):
    loss = method.step(model, x, y, ctx).loss
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


def _assert_equals_ce(method, model, x, y, ctx):
    got, got_g = _value_and_grads(method, model, x, y, ctx)
    want, want_g = _value_and_grads(create_method("ce"), model, x, y, ctx)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["bootstrap-soft", "bootstrap-hard"])
def test_bootstrap_with_beta_one_is_cross_entropy(name):
    model, x, y, _, _, opt = _problem()
    _assert_equals_ce(create_method(name, bootstrap_beta=1.0), model, x, y, _ctx(opt))
    # and with the paper's beta it is not: the test above can tell the two apart
    logits = model(x)
    assert not torch.allclose(bootstrap_loss(logits, y, 0.8, hard=name.endswith("hard")), F.cross_entropy(logits, y))


def test_mixup_with_alpha_zero_is_cross_entropy():
    model, x, y, _, _, opt = _problem(seed=1)
    _assert_equals_ce(create_method("mixup", mixup_alpha=0.0, seed=3), model, x, y, _ctx(opt))


def test_distill_with_lambda_zero_is_cross_entropy_and_uses_the_teacher_otherwise():
    model, x, y, _, _, opt = _problem(seed=2)
    teacher = create_model("small-cnn", num_classes=4, in_channels=2, width=4).double().eval()
    _assert_equals_ce(Distill(0.0, 1, teacher=teacher), model, x, y, _ctx(opt))
    with torch.no_grad():
        s = torch.softmax(teacher(x), 1)
        logits = model(x)
        want = F.cross_entropy(logits, 0.7 * s + 0.3 * F.one_hot(y, 4).double())  # target = lam s + (1 - lam) y
        got = Distill(0.7, 1, teacher=teacher).step(model, x, y, _ctx(opt)).loss
    assert torch.allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------- GLC on a synthetic problem

def _clusters(n_per_class, k=3, seed=0, spread=12.0):
    """uint8 'images' (N, 1, 2, 2) drawn around k well-separated centres; true labels (N,)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[50, 50, 50, 50], [200, 50, 200, 50], [50, 200, 50, 200], [200, 200, 50, 50]][:k], float)
    y = np.repeat(np.arange(k), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), 4))
    return np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 1, 2, 2), y


def test_glc_recovers_a_known_corruption_matrix():
    # rows: true class, columns: observed; class 2 is clean, class 0 goes to 1 with 0.4, 1 to 2 with 0.2
    c_true = np.array([[0.6, 0.4, 0.0], [0.0, 0.8, 0.2], [0.0, 0.0, 1.0]])
    rng = np.random.default_rng(1)
    x, y = _clusters(1000, seed=1)
    y_obs = np.array([rng.choice(3, p=c_true[t]) for t in y])
    xc, yc = _clusters(100, seed=2)
    mean, std = torch.full((1,), 0.5), torch.full((1,), 0.25)
    td = types.SimpleNamespace(train=DeviceImages(x, "cpu", mean, std), y_observed=torch.as_tensor(y_obs),
                               clean=DeviceImages(xc, "cpu", mean, std), y_clean=torch.as_tensor(yc), num_classes=3)
    cfg = Config(lr=0.05, batch_size=100, grad_clip=0, weight_decay=0)
    torch.manual_seed(0)
    glc = GLC(epochs=8)
    glc.prepare(PrepareContext(cfg, td, torch.device("cpu"),
                               lambda: create_model("mlp", num_classes=3, in_channels=1, in_features=4, hidden=32),
                               lambda m, images, labels, epochs: fit_ce(m, images, labels, cfg=cfg, epochs=epochs)))
    err = np.abs(glc.corruption.numpy() - c_true).max()
    assert err < 0.06, (err, glc.corruption)  # tolerance: 0.06 per entry (1,000 noisy images per class)
    # the estimator alone: a model that outputs exactly C[true] gives C back
    assert torch.allclose(estimate_corruption(torch.as_tensor(c_true)[torch.as_tensor(yc)], torch.as_tensor(yc), 3),
                          torch.as_tensor(c_true))


# ---------------------------------------------------------------- meta methods: oracles and training

def _reference_meta_grad(model, net, x, y, xv, yv, opt, kind):
    """Double backward through a functional look-ahead: the obviously-correct slow path."""
    params = {n: p for n, p in model.named_parameters()}
    shift, scale = lookahead_affine(params, opt)
    with meta_mode(model):
        theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        logits = functional_call(model, theta, (x,))
        if kind in ("mwnet", "mwnet-sum"):
            losses = F.cross_entropy(logits, y, reduction="none")
            v = net(losses.detach())
            # MW-Net.py: the mean of V l; train_WRN-28-10_Meta_PGC.py: V normalised by its sum
            train_loss = (v * losses).mean() if kind == "mwnet" else (v * losses).sum() / v.sum()
        else:
            logp = F.log_softmax(logits, 1)
            train_loss = -(net(logp.detach().exp(), y) * logp).sum(1).mean()
        grads = torch.autograd.grad(train_loss, list(theta.values()), create_graph=True)
        theta_hat = {n: theta[n] - shift[n] - scale[n] * g for n, g in zip(theta, grads)}
        clean = F.cross_entropy(functional_call(model, theta_hat, (xv,)), yv)
        return torch.autograd.grad(clean, list(net.parameters()))


@pytest.mark.parametrize("kind", ["mwnet", "mwnet-sum", "mlc"])
def test_meta_network_gradient_equals_double_backward_oracle(kind):
    model, x, y, xv, yv, opt = _problem(seed=4)
    torch.manual_seed(5)
    net = (LabelCorrectionNet(4, 8) if kind == "mlc" else WeightNet(8)).double()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    if kind == "mlc":
        fast, _ = mlc_meta_grad(model, net, x, y, xv, yv, opt)
    else:
        fast, _ = mwnet_meta_grad(model, net, x, y, xv, yv, opt, normalize=kind == "mwnet-sum")
    ref = _reference_meta_grad(model, net, x, y, xv, yv, opt, kind)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-12 * float(b.abs().max().clamp_min(1e-30)) + 1e-16), (a, b)
    assert any(b.abs().max() > 0 for b in ref)  # a non-trivial comparison
    assert all(torch.equal(b, model.get_buffer(n)) for n, b in buffers.items())  # running stats untouched


@pytest.mark.parametrize("kind", ["mwnet", "mlc"])
def test_meta_network_methods_refuse_data_parallelism(kind):
    # under --nproc 2 each rank stepped its own copy of the meta network on its shard, and the copies
    # drifted apart (seen with 2 gloo ranks: the ranks' meta networks differed after 3 steps): refused
    data = types.SimpleNamespace(num_classes=4)
    method = create_method(kind, meta_hidden=8)
    with pytest.raises(L2BError, match="one process only"):
        method.prepare(PrepareContext(Config(nproc=2), data, torch.device("cpu"), None, None))
    method.prepare(PrepareContext(Config(), data, torch.device("cpu"), None, None))
    method.net.double()
    model, x, y, xv, yv, opt = _problem()
    with pytest.raises(L2BError, match="one process only"):
        method.step(model, x, y, StepContext(opt, lambda: (xv, yv), 5, 4, module=model, world_size=2))
    assert torch.isfinite(method.step(model, x, y, _ctx(opt, xv, yv)).loss)  # one process runs


def test_mwnet_learns_to_down_weight_flipped_samples():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x_np, y_true = _clusters(200, k=4, seed=3, spread=25.0)
    flipped = rng.random(len(y_true)) < 0.4
    y_obs = np.where(flipped, (y_true + rng.integers(1, 4, len(y_true))) % 4, y_true)
    xc, yc = _clusters(25, k=4, seed=4, spread=25.0)
    to_x = lambda a: (torch.as_tensor(a).float().view(len(a), -1) - 127.5) / 60  # noqa: E731
    x, y, xv, yv = to_x(x_np), torch.as_tensor(y_obs), to_x(xc), torch.as_tensor(yc)
    model = create_model("mlp", num_classes=4, in_features=4, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):  # warm-up with CE: clean samples fit first, flipped ones keep high losses
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    method = MWNet(hidden=32, meta_lr=1e-2, seed=0)
    method.prepare(PrepareContext(Config(), None, torch.device("cpu"), None, None))
    before = [p.detach().clone() for p in method.net.parameters()]

    def weights():
        with torch.no_grad():
            w = method.net(F.cross_entropy(model(x), y, reduction="none"))
        return float(w[torch.as_tensor(flipped)].mean()), float(w[~torch.as_tensor(flipped)].mean())

    w_flip0, _ = weights()
    for step in range(60):
        idx = torch.randperm(len(y))[:100]
        result = method.step(model, x[idx], y[idx], _ctx(opt, xv, yv))
        opt.zero_grad()
        result.loss.backward()
        opt.step()
    w_flip, w_clean = weights()
    assert any(not torch.allclose(a, b) for a, b in zip(before, method.net.parameters()))
    assert w_flip < w_flip0 - 0.05, (w_flip0, w_flip)
    assert w_flip < w_clean - 0.05, (w_flip, w_clean)


@pytest.mark.parametrize("method, draws", [("ce", False), ("bootstrap-soft", False), ("glc", True), ("l2rw", True)])
def test_the_clean_batch_size_changes_only_the_methods_that_draw_a_clean_batch(tmp_path, tiny_args, method, draws):
    # the recipe study pairs ce runs made before the clean batch changed with l2b runs made after, and
    # bootstrapping's runs of both times (tools/select_by_val.py): valid only because neither draws a clean
    # batch; glc trains on clean batches, so it is rerun
    from helpers import same_model
    from l2b.cli import main

    args = [a for a in tiny_args if a not in ("--val-batch-size", "20")] + ["--stage1-epochs", "1", "--method", method]
    for m in ("20", "0"):
        assert main(["train", "--out", str(tmp_path / m), "--val-batch-size", m, *args]) == 0
    differing = same_model(tmp_path / "20", tmp_path / "0")
    assert bool(differing) == draws, differing


def test_the_methods_that_fit_the_clean_set_say_so():
    # their clean-val accuracy is a training accuracy (GLC's reaches 100% in the study): the trainer and the
    # study's tables read their best clean-val epoch as selecting nothing, so the flag must be right
    from types import SimpleNamespace

    from l2b.methods import create_method, fits_clean_set, list_methods

    fits = {m for m in list_methods() if fits_clean_set(create_method(m))}
    assert fits == {"glc", "ce+clean"}
    # a method written before the flag existed (docs/EXTENDING.md's members) falls back to trains_on_clean
    assert fits_clean_set(SimpleNamespace(trains_on_clean=True)) and not fits_clean_set(SimpleNamespace(trains_on_clean=False))
