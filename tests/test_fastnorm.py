"""The fast tangent rules (l2b.fastnorm) change how a tangent is computed, nothing else."""

import copy
import gc
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import l2b
from l2b import create_model
from l2b.meta import dual_forward
from l2b.fastnorm import fast_tangents, native_tangents

D = torch.float64


def _run(module, x, x_t, params, tangents, *, fast=True):
    """module(x) with params, in a dual level: (primal output, tangent); ``tangents`` name -> dparam."""
    with fwAD.dual_level(), (fast_tangents(module) if fast else native_tangents()):
        dual = {n: fwAD.make_dual(p, tangents[n]) if n in tangents else p for n, p in params.items()}
        inp = fwAD.make_dual(x, x_t) if x_t is not None else x
        out, tangent = fwAD.unpack_dual(functional_call(module, dual, (inp,)))
    return out, tangent


def _bn_jvp(x, x_t, w, w_t, b, b_t, eps):
    """The oracle: torch.func.jvp of F.batch_norm in training mode (batch statistics)."""
    fn = lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, eps)  # noqa: E731
    return torch.func.jvp(fn, (x, w, b), (x_t, w_t, b_t))


@pytest.mark.parametrize("shape,cls", [((16, 5, 4, 3), nn.BatchNorm2d), ((12, 6), nn.BatchNorm1d),
                                       ((10, 3, 7), nn.BatchNorm1d), ((6, 2, 3, 4, 2), nn.BatchNorm3d)])
@pytest.mark.parametrize("which", ["all", "x", "params", "weight", "bias"])
def test_batchnorm_primal_and_tangent_equal_torch_func_jvp(shape, cls, which):
    torch.manual_seed(0)
    bn = cls(shape[1], eps=1e-3, track_running_stats=False).to(D)
    params = {n: torch.randn_like(p) for n, p in bn.named_parameters()}
    x = 3 + 2 * torch.randn(shape, dtype=D)  # a mean away from 0: the centred formula matters
    x_t = torch.randn_like(x) if which in ("all", "x") else None
    tangents = {n: torch.randn_like(p) for n, p in params.items()
                if which in ("all", "params") or which == n}
    out, tangent = _run(bn, x, x_t, params, tangents)
    zero = torch.zeros_like
    want, want_t = _bn_jvp(x, x_t if x_t is not None else zero(x), params["weight"],
                           tangents.get("weight", zero(params["weight"])), params["bias"],
                           tangents.get("bias", zero(params["bias"])), 1e-3)
    assert torch.equal(out, F.batch_norm(x, None, None, params["weight"], params["bias"], True, 0.0, 1e-3))
    assert torch.allclose(tangent, want_t, rtol=1e-10, atol=1e-12), float((tangent - want_t).abs().max())


def test_batchnorm_without_affine_parameters():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4, affine=False).to(D)
    x, x_t = torch.randn(8, 4, 3, 3, dtype=D), torch.randn(8, 4, 3, 3, dtype=D)
    out, tangent = _run(bn, x, x_t, {}, {})
    _, want_t = torch.func.jvp(lambda x: F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5), (x,), (x_t,))
    assert torch.allclose(tangent, want_t, rtol=1e-10, atol=1e-12)


def _fast_primal(module, names, x_t):
    """f(x, *params) = module's output under the fast rules (a tangent on x keeps them switched on)."""
    def f(x, *values):
        with fwAD.dual_level(), fast_tangents(module):
            return fwAD.unpack_dual(functional_call(module, dict(zip(names, values)), (fwAD.make_dual(x, x_t),)))[0]
    return f


@pytest.mark.parametrize("module", [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                    nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.ReLU(inplace=True),
                                                  nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                  nn.Linear(4, 2))])
def test_reverse_gradient_of_the_fast_path_passes_gradcheck(module):
    torch.manual_seed(2)
    module = module.to(D)
    names = [n for n, _ in module.named_parameters()]
    x = torch.randn(6, 3, 6, 6, dtype=D, requires_grad=True)
    values = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert torch.autograd.gradcheck(_fast_primal(module, names, torch.randn_like(x)), (x, *values))


def test_forward_mode_of_the_fast_rules_passes_gradcheck():
    # gradcheck's own dual tensors (inputs and parameters) go through the fast rules
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)).to(D)
    names = [n for n, _ in net.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for p in net.parameters()]

    def f(x, *values):
        with fast_tangents(net):
            return functional_call(net, dict(zip(names, values)), (x,))

    x = torch.randn(5, 2, 6, 6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *values), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training,track", [(True, True), (True, False), (False, True)])
def test_running_statistics_move_exactly_as_batchnorm2d(momentum, training, track):
    torch.manual_seed(4)
    plain = nn.BatchNorm2d(3, momentum=momentum, track_running_stats=track)
    plain.running_mean = torch.randn(3) if track else None
    plain.train(training)
    fast = copy.deepcopy(plain)
    params = dict(fast.named_parameters())
    for _ in range(3):
        x = 1 + torch.randn(8, 3, 4, 4)
        want = plain(x)
        out, _ = _run(fast, x, torch.randn_like(x), params, {n: torch.randn_like(p) for n, p in params.items()})
        assert torch.equal(out, want)
        for a, b in zip(plain.buffers(), fast.buffers()):
            assert torch.equal(a, b)
    if track:
        assert int(fast.num_batches_tracked) == (3 if training else 0)


@pytest.mark.parametrize("name,shape", [("small-cnn", (2, 12, 12)), ("preact-resnet18", (3, 8, 8)),
                                        ("mlp", (1, 6, 6))])
def test_fused_forward_is_unchanged_but_for_speed(name, shape):
    # the training forward that carries the tangent: same logits, gradients and running statistics
    # as PyTorch's generic rules, bit for bit, and the same tangent to rounding (float64)
    torch.manual_seed(5)
    kw = {"in_features": 36} if name == "mlp" else {"width": 4}
    fast = create_model(name, num_classes=3, in_channels=shape[0], **kw).to(D)
    generic = copy.deepcopy(fast)
    x = torch.randn(10, *shape, dtype=D)
    direction = {n: torch.randn_like(p) for n, p in fast.named_parameters()}
    logits, tangent = dual_forward(fast, x, dict(fast.named_parameters()), direction)
    with native_tangents():
        want, want_t = dual_forward(generic, x, dict(generic.named_parameters()), direction)
    assert torch.equal(logits, want)
    assert torch.allclose(tangent, want_t, rtol=1e-10, atol=1e-12 * float(want_t.abs().max()))
    logits.square().sum().backward()
    want.square().sum().backward()
    for (n, p), q in zip(fast.named_parameters(), generic.parameters()):
        assert torch.equal(p.grad, q.grad), n
    for a, b in zip(fast.buffers(), generic.buffers()):
        assert torch.equal(a, b)


def test_layers_without_a_tangent_or_with_frozen_weights():
    # the first layer's input has no tangent; a frozen weight leaves only the bias tangent
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2)).to(D)
    x = torch.randn(4, 2, 4, 4, dtype=D)
    params = dict(net.named_parameters())
    for moving in (["0.bias", "3.bias"], ["1.weight"], ["3.weight"]):
        tangents = {n: torch.randn_like(params[n]) for n in moving}
        got = _run(copy.deepcopy(net), x, None, params, tangents)
        want = _run(copy.deepcopy(net), x, None, params, tangents, fast=False)
        assert torch.equal(got[0], want[0])
        assert torch.allclose(got[1], want[1], rtol=1e-10, atol=1e-13)


def test_intermediate_tangents_are_freed_during_the_forward():
    # the generic rules keep every ReLU's tangent alive (its graph saves the output, which holds the
    # tangent) until the dual level closes: the fused forward then peaks at activations + tangents
    def alive_after_forward(fast):
        torch.manual_seed(7)
        net = create_model("small-cnn", num_classes=3, in_channels=1, width=4)
        refs = []
        net.features[0].register_forward_hook(lambda m, i, out: refs.append(weakref.ref(fwAD.unpack_dual(out).tangent)))
        params = dict(net.named_parameters())
        with fwAD.dual_level(), (fast_tangents(net) if fast else native_tangents()):
            dual = {n: fwAD.make_dual(p, torch.randn_like(p)) for n, p in params.items()}
            logits = functional_call(net, dual, (torch.randn(6, 1, 8, 8),))
            gc.collect()
            alive = refs[0]() is not None
        logits.sum().backward()
        return alive

    assert alive_after_forward(fast=False)  # the case this guards against exists
    assert not alive_after_forward(fast=True)


def test_bf16_autocast_weights_are_close_to_float32():
    # the tangent along the real direction (lr x the clean gradient), as the trainer takes it
    torch.manual_seed(8)
    net = create_model("small-cnn", num_classes=4, in_channels=3, width=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 3, 12, 12), torch.randint(0, 4, (64,))
    xv, yv = torch.randn(32, 3, 12, 12), torch.randint(0, 4, (32,))
    raw = lambda w: torch.cat([w.raw_alpha, w.raw_beta]).double()  # noqa: E731
    exact = raw(l2b.meta_weights(net, x, y, xv, yv, optimizer=opt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = raw(l2b.meta_weights(net, x, y, xv, yv, optimizer=opt))
        with native_tangents():
            generic = raw(l2b.meta_weights(net, x, y, xv, yv, optimizer=opt))
    err = lambda r: float((r - exact).norm() / exact.norm())  # noqa: E731
    # bf16 rounding (the clean gradient's above all) sets the error; the fast rules add nothing to it
    assert err(fast) < 1.05 * err(generic) + 1e-3, (err(fast), err(generic))
    assert float(torch.corrcoef(torch.stack([fast, exact]))[0, 1]) > 0.98
    assert float((fast - generic).norm() / generic.norm()) < 0.1 * err(generic)


def test_swapped_forwards_are_restored_and_others_left_alone():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SyncBatchNorm(2), nn.BatchNorm2d(2), nn.ReLU())
    custom = lambda x: x  # noqa: E731
    net[3].forward = custom  # replaced on the instance by someone else: not ours to swap
    with fast_tangents(net):
        assert "forward" in vars(net[0]) and "forward" in vars(net[2])
        assert "forward" not in vars(net[1]) and net[3].forward is custom
        with native_tangents(), fast_tangents(net[0]):
            pass  # under native_tangents nothing is swapped (nor unswapped)
        assert "forward" in vars(net[0])
    assert all("forward" not in vars(m) for m in net[:3]) and net[3].forward is custom
    with pytest.raises(RuntimeError), fast_tangents(net):
        raise RuntimeError("restored on error too")
    assert "forward" not in vars(net[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp,channels_last", [(None, False), (torch.bfloat16, True), (torch.float16, False)])
def test_fused_forward_on_cuda_matches_the_generic_rules(amp, channels_last):
    # cuDNN BatchNorm (its saved statistics and reserve space feed the tangent), autocast, NHWC
    torch.manual_seed(9)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    fast = create_model("preact-resnet18", num_classes=5, width=8).cuda().to(memory_format=layout)
    generic = copy.deepcopy(fast)
    x = torch.randn(32, 3, 16, 16, device="cuda").contiguous(memory_format=layout)
    direction = {n: 1e-2 * torch.randn_like(p) for n, p in fast.named_parameters()}
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        logits, tangent = dual_forward(fast, x, dict(fast.named_parameters()), direction)
        with native_tangents():
            want, want_t = dual_forward(generic, x, dict(generic.named_parameters()), direction)
    tol = 1e-4 if amp is None else 3e-2
    assert torch.allclose(logits, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert float((tangent.float() - want_t.float()).norm() / want_t.float().norm()) < tol
    logits.float().square().sum().backward()
    want.float().square().sum().backward()
    for (n, p), q in zip(fast.named_parameters(), generic.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=tol, atol=tol * float(q.grad.abs().max())), n
    for a, b in zip(fast.buffers(), generic.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
