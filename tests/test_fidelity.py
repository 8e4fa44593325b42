"""Paper-to-code fidelity: the identities of Zhou et al. (CVPR 2024) that the code must satisfy.

Each test checks one statement of the paper against the library (docs/METHOD.md maps every
equation to its code): Appendix B.1 (L2B with alpha_i + beta_i = 1 is the bootstrapping loss),
Appendix B.2 (eq. 23, 28: the raw weights are lr times inner products of gradients), Theorem 1
(eq. 11: one step does not raise the clean loss for a small enough lr) and Table 7 (beta = 0 is L2RW).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from l2b import create_model, meta_weights
from l2b.methods import StepContext, create_method
from test_meta import _optimizer as _warm_optimizer  # SGD after two real steps: momentum buffers exist

DTYPE = torch.float64


def _mlp(seed, d=6, k=4, hidden=8):
    """A small BatchNorm-free net: per-sample gradients are well defined sample by sample."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).to(DTYPE)


def _batches(seed, n=16, m=24, d=6, k=4):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = torch.randint(0, k, (n,), generator=g)
    xv = torch.randn(m, d, generator=g, dtype=DTYPE)
    yv = torch.randint(0, k, (m,), generator=g)
    return x, y, xv, yv


def _ctx(opt, xv, yv, k=4):
    return StepContext(optimizer=opt, next_clean=lambda: (xv, yv), epoch=1, num_classes=k)


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


# ---------------------------------------------------------------- Appendix B.1

def test_convex_l2b_loss_is_the_bootstrapping_loss_in_value_and_gradient():
    # Appendix B.1: with alpha_i + beta_i = 1, sum_i alpha_i CE(z_i, y_i) + beta_i CE(z_i, p_i) is the
    # bootstrapping loss CE(z_i, alpha_i onehot(y_i) + beta_i onehot(p_i)) of Reed et al. (hard form).
    # Checked on the `l2b-convex` method's own loss, as the trainer backpropagates it.
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=4, in_channels=2, width=4).to(DTYPE)
    x, y = torch.randn(32, 2, 8, 8, dtype=DTYPE), torch.randint(0, 4, (32,))
    xv, yv = torch.randn(10, 2, 8, 8, dtype=DTYPE), torch.randint(0, 4, (10,))
    opt = _warm_optimizer(model, "momentum_wd", x, y)
    result = create_method("l2b-convex").step(model, x, y, _ctx(opt, xv, yv))
    # the step reports the weights of its summed batch loss: alpha_i / n and beta_i / n under convex
    n = len(y)
    alpha, beta, pseudo, logits = result.alpha * n, result.beta * n, result.pseudo, result.logits
    assert torch.allclose(alpha + beta, torch.ones_like(alpha))
    assert not torch.allclose(alpha, torch.full_like(alpha, 0.5))  # the weights carry information
    assert torch.equal(pseudo, logits.detach().argmax(1))
    target = alpha[:, None] * F.one_hot(y, 4).to(DTYPE) + beta[:, None] * F.one_hot(pseudo, 4).to(DTYPE)
    bootstrap = F.cross_entropy(logits, target)  # (n, K) soft targets, mean over the batch
    assert torch.allclose(result.loss, bootstrap, rtol=1e-12, atol=0)
    params = list(model.parameters())
    assert torch.allclose(_flat_grad(result.loss, params), _flat_grad(bootstrap, params), rtol=1e-10, atol=1e-14)
    # and the identity is not vacuous: it fails when the two labels' weights are exchanged
    swapped = F.cross_entropy(logits, beta[:, None] * F.one_hot(y, 4).to(DTYPE)
                              + alpha[:, None] * F.one_hot(pseudo, 4).to(DTYPE))
    assert (pseudo != y).any() and not torch.allclose(result.loss, swapped, rtol=1e-6)


# ---------------------------------------------------------------- Appendix B.2 (eq. 23, 28)

def _lookahead_by_hand(p, state, group, first_step):
    """theta' (the look-ahead point at alpha = beta = 0) and s (the gradient's step), written out
    from torch.optim.SGD's update rule for one parameter, independently of l2b.meta."""
    lr, mu, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
    buf = None if first_step else state.get("momentum_buffer")
    decay = wd * p.detach()
    if mu == 0:
        return p.detach() - lr * decay, lr
    if first_step:  # buf = d = grad + decay
        return p.detach() - lr * (1 + mu if nesterov else 1) * decay, lr * (1 + mu if nesterov else 1)
    new_buf0 = mu * buf + decay  # dampening 0
    if nesterov:  # update = d + mu * (mu * buf + d)
        return p.detach() - lr * (decay + mu * new_buf0), lr * (1 + mu)
    return p.detach() - lr * new_buf0, lr


@pytest.mark.parametrize("meta_loss", ["mean", "sum"])
@pytest.mark.parametrize("opt_kind", ["plain", "momentum_wd", "nesterov", "first_momentum_step"])
def test_raw_weights_are_lr_times_inner_products_with_per_sample_gradients(opt_kind, meta_loss):
    # Appendix B.2 (eq. 23, 28): -dG/dalpha_i = s <grad G(theta'), grad f_i(theta)> and
    # -dG/dbeta_i = s <grad G(theta'), grad g_i(theta)>, g_i with the hard pseudo-label p_i; G the
    # mean clean loss (Algorithm 1) or, with meta_loss="sum", the summed one of eq. 7.
    # tests/test_meta.py checks the alpha half with plain SGD on a BatchNorm net held in eval mode;
    # this adds beta, pseudo-labels and the momentum / weight-decay / Nesterov look-ahead point.
    model = _mlp(seed=3)
    x, y, xv, yv = _batches(seed=3)
    first = opt_kind == "first_momentum_step"
    if first:  # no momentum buffer yet: torch's SGD sets buf = d on this step
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-2)
    else:
        opt = _warm_optimizer(model, opt_kind, x, y)
    w = meta_weights(model, x, y, xv, yv, optimizer=opt, meta_loss=meta_loss)

    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    group = opt.param_groups[0]
    ahead = [_lookahead_by_hand(p, opt.state.get(p, {}), group, first) for p in params]
    theta_prime = {n: tp.requires_grad_(True) for n, (tp, _) in zip(names, ahead)}
    steps = [s for _, s in ahead]
    assert len(set(steps)) == 1  # one parameter group: one s for all parameters
    s = steps[0]
    grad_G = _flat_grad(F.cross_entropy(functional_call(model, theta_prime, (xv,)), yv, reduction=meta_loss),
                        list(theta_prime.values()))
    if opt_kind != "plain":  # the look-ahead point is not theta: the test would see a wrong point
        grad_G_at_theta = _flat_grad(F.cross_entropy(model(xv), yv), params)
        assert not torch.allclose(grad_G, grad_G_at_theta, rtol=1e-3)

    pseudo = model(x).argmax(1)
    assert torch.equal(w.pseudo, pseudo)
    assert (pseudo != y).any()  # the beta half is not a copy of the alpha half
    for i in range(len(y)):
        logits_i = model(x[i : i + 1])  # no BatchNorm: a sample's gradient does not depend on the batch
        grad_f = _flat_grad(F.cross_entropy(logits_i, y[i : i + 1]), params)
        grad_g = _flat_grad(F.cross_entropy(logits_i, pseudo[i : i + 1]), params)
        assert torch.isclose(w.raw_alpha[i], s * grad_G @ grad_f, rtol=1e-9, atol=1e-15), i
        assert torch.isclose(w.raw_beta[i], s * grad_G @ grad_g, rtol=1e-9, atol=1e-15), i


# ---------------------------------------------------------------- Theorem 1 (eq. 11)

def _clean_loss(model, xv, yv):
    with torch.no_grad():
        return F.cross_entropy(model(xv), yv).item()


def _step_with(model, x, y, alpha, beta, pseudo, lr):
    """One real step (eq. 10) with given weights and plain SGD at lr, on a copy of the model."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    logits = model(x)
    loss = (alpha * F.cross_entropy(logits, y, reduction="none") + beta * F.cross_entropy(logits, pseudo, reduction="none")).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return model


@pytest.mark.parametrize("seed", range(5))
def test_one_l2b_step_does_not_raise_the_clean_loss_for_small_lr(seed):
    # Theorem 1 (eq. 11): with the clean batch = the whole clean set and a small enough lr, one L2B
    # step does not increase G. To first order the change is -lr * sum_i (alpha_i a_i + beta_i b_i)
    # / s with a_i, b_i the raw weights (non-negative where alpha, beta > 0), so G falls.
    model = _mlp(seed)
    x, y, xv, yv = _batches(seed, n=32, m=40)
    small, large = 1e-3, 200.0
    opt = torch.optim.SGD(model.parameters(), lr=small)
    w = meta_weights(model, x, y, xv, yv, optimizer=opt)
    assert torch.isclose(w.alpha.sum() + w.beta.sum(), torch.tensor(1.0, dtype=DTYPE))
    assert (w.raw_alpha < 0).any() or (w.raw_beta < 0).any()  # some terms would hurt: weighting matters
    G0 = _clean_loss(model, xv, yv)

    G_small = _clean_loss(_step_with(model, x, y, w.alpha, w.beta, w.pseudo, small), xv, yv)
    assert G_small < G0
    # the decrease is the first-order prediction lr * sum_i (alpha_i a_i + beta_i b_i) / s, s = lr here
    predicted = (w.alpha @ w.raw_alpha + w.beta @ w.raw_beta).item()
    assert (G0 - G_small) == pytest.approx(predicted, rel=0.05)

    # not trivially true: the same weights with a large lr overshoot, and weights of the wrong sign
    # (clamp of -raw, normalised the same way) raise G at the small lr
    G_large = _clean_loss(_step_with(model, x, y, w.alpha, w.beta, w.pseudo, large), xv, yv)
    assert G_large > G0
    wrong = torch.cat([-w.raw_alpha, -w.raw_beta]).clamp_min(0)
    wrong = wrong / wrong.sum()
    n = len(y)
    G_wrong = _clean_loss(_step_with(model, x, y, wrong[:n], wrong[n:], w.pseudo, small), xv, yv)
    assert G_wrong > G0


# ---------------------------------------------------------------- Table 7: beta = 0 is L2RW

def test_l2rw_step_equals_l2b_with_beta_forced_to_zero():
    # Table 7: L2B with beta = 0 is L2RW (Ren et al. 2018): alpha = max(raw_alpha, 0) normalised over
    # the n samples only, no pseudo-label term. Compared after one real optimizer step, BatchNorm net.
    torch.manual_seed(0)
    base = create_model("small-cnn", num_classes=4, in_channels=2, width=4).to(DTYPE)
    x, y = torch.randn(32, 2, 8, 8, dtype=DTYPE), torch.randint(0, 4, (32,))
    xv, yv = torch.randn(10, 2, 8, 8, dtype=DTYPE), torch.randint(0, 4, (10,))

    def run(step_loss):
        """The parameters after one real step, minus those before (the step itself)."""
        model = copy.deepcopy(base)
        opt = _warm_optimizer(model, "momentum_wd", x, y)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        loss = step_loss(model, opt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before

    def l2rw(model, opt):
        return create_method("l2rw").step(model, x, y, _ctx(opt, xv, yv)).loss

    def l2b_beta_zero(model, opt):
        w = meta_weights(model, x, y, xv, yv, optimizer=opt, mode="l2b")  # the l2b raw weights
        alpha = w.raw_alpha.clamp_min(0)
        alpha = alpha / alpha.sum()  # beta forced to 0: alpha normalised over n only
        return (alpha * F.cross_entropy(model(x), y, reduction="none")).sum()

    def l2b(model, opt):
        result = create_method("l2b").step(model, x, y, _ctx(opt, xv, yv))
        # where every pseudo-label equals the observed label, l2b and l2rw coincide
        assert (result.pseudo != y).any() and (result.beta > 0).any()
        return result.loss

    step_l2rw, step_forced, step_l2b = run(l2rw), run(l2b_beta_zero), run(l2b)
    scale = step_l2rw.abs().max()
    assert torch.allclose(step_l2rw, step_forced, rtol=1e-9, atol=1e-12 * float(scale))
    assert (step_l2rw - step_l2b).abs().max() > 1e-3 * scale  # beta matters: the ablation is real
