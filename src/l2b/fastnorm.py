"""Fast forward-mode (tangent) rules for BatchNorm, convolution, linear, ReLU and pooling layers.

The exact meta-weights take the tangent of the logits along a parameter direction v with PyTorch's
forward-mode AD (``meta.dual_forward``), and in training that pass is the real forward, whose logits
are backpropagated. PyTorch's generic rules made that tangent cost about four backwards:

* BatchNorm's forward-mode derivative runs as a chain of separate elementwise and reduction kernels
  (about 4.5x the primal BatchNorm);
* while the primal requires grad (the fused training forward), every tangent is itself recorded for
  a second-order backward that never comes: its kernels pay autograd's bookkeeping, and a ReLU's
  recorded tangent saves the ReLU's output, which holds that very tangent, so every ReLU's tangent
  stays alive until the dual level closes (the fused step peaked at 2.6-3.3x the memory of the
  unfused one, measured with ``l2b bench step --memory``).

:func:`fast_tangents` swaps, for the duration of a ``with`` block, the forward of every such layer
of a model for one that runs the *same* native primal op on the primal tensors (so the output, the
backward and the running statistics are exactly those of the plain module) and attaches a tangent
computed without autograd:

* convolution and linear: d(x * W + b) = dx * W + x * dW + db (the two products of the generic rule);
* ReLU: dx where the output is positive; max pooling: dx at the maxima; average pooling: itself;
* BatchNorm in training mode (batch statistics; Ioffe & Szegedy 2015), with
  xhat = (x - mu) / sqrt(var + eps) and y = gamma * xhat + beta, means over every axis but channels:

      d xhat = (dx - mean(dx) - xhat * mean(dx * xhat)) / sqrt(var + eps)
      dy     = gamma * d xhat + d gamma * xhat + d beta,

  from the batch statistics the primal kernel saved, with the two per-channel means taken by the
  native BatchNorm backward kernel in one pass (its grad_bias and grad_weight are sum(g) and
  sum(g * xhat) for g = dx) and dy by two elementwise passes.

Only modules are swapped: a functional call (``F.relu(x)``) keeps the generic rule (correct, slower,
and its tangent lives to the end of the pass). Outside a forward-mode dual level, or for an input
without a tangent, a swapped layer runs the plain module's forward. Subclasses with a forward of
their own, SyncBatchNorm, lazy modules and modules whose forward was already replaced on the
instance are left alone.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["fast_tangents", "native_tangents"]

_STATE = threading.local()  # native_tangents() switches the fast rules off for this thread


def _unpack(t: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(primal, tangent) of a possibly dual tensor; a missing or known-zero tangent is None."""
    if t is None:
        return None, None
    primal, tangent = fwAD.unpack_dual(t)
    if tangent is not None and tangent._is_zerotensor():
        tangent = None
    return primal, tangent


def _conv_forward(self, x: Tensor) -> Tensor:
    """Conv{1,2,3}d: the module's own convolution on the primals, tangent dx * W + x * dW + db."""
    x_p, x_t = _unpack(x)
    w_p, w_t = _unpack(self.weight)
    b_p, b_t = _unpack(self.bias)
    if x_t is None and w_t is None and b_t is None:
        return type(self).forward(self, x)
    out = self._conv_forward(x_p, w_p, b_p)
    with torch.no_grad():
        tangent = self._conv_forward(x_t, w_p, None) if x_t is not None else None
        if w_t is not None:
            term = self._conv_forward(x_p, w_t, b_t)
            tangent = term if tangent is None else tangent.add_(term)
        elif b_t is not None:
            term = b_t.reshape(-1, *([1] * (out.dim() - 2))).to(out.dtype)  # (C, 1, ...)
            tangent = term.expand_as(out).clone() if tangent is None else tangent.add_(term)
    return fwAD.make_dual(out, tangent)


def _linear_forward(self, x: Tensor) -> Tensor:
    """Linear: the module's own matmul on the primals, tangent dx W^T + x dW^T + db."""
    x_p, x_t = _unpack(x)
    w_p, w_t = _unpack(self.weight)
    b_p, b_t = _unpack(self.bias)
    if x_t is None and w_t is None and b_t is None:
        return type(self).forward(self, x)
    out = nn.functional.linear(x_p, w_p, b_p)
    with torch.no_grad():
        tangent = nn.functional.linear(x_t, w_p) if x_t is not None else None
        if w_t is not None or b_t is not None:
            term = (nn.functional.linear(x_p, w_t, b_t) if w_t is not None
                    else b_t.to(out.dtype).expand_as(out).clone())
            tangent = term if tangent is None else tangent.add_(term)
    return fwAD.make_dual(out, tangent)


def _relu_forward(self, x: Tensor) -> Tensor:
    """ReLU: relu on the primal, tangent dx where the output is positive.

    Out of place even for ``inplace=True`` (an optional saving, the output is the same): in place on
    the primal view would make the backward copy the whole gradient (CopySlices).
    """
    x_p, x_t = _unpack(x)
    if x_t is None:
        return type(self).forward(self, x)
    out = torch.relu(x_p)
    with torch.no_grad():
        tangent = torch.ops.aten.threshold_backward(x_t, out, 0)  # the generic rule's own kernel
    return fwAD.make_dual(out, tangent)


def _maxpool_forward(self, x: Tensor):
    """MaxPool2d: max pooling on the primal, tangent dx gathered at the maxima."""
    x_p, x_t = _unpack(x)
    if x_t is None:
        return type(self).forward(self, x)
    out, indices = nn.functional.max_pool2d(x_p, self.kernel_size, self.stride, self.padding, self.dilation,
                                            ceil_mode=self.ceil_mode, return_indices=True)
    with torch.no_grad():  # indices address the flattened (H * W) plane of each (n, c)
        tangent = x_t.flatten(-2).gather(-1, indices.flatten(-2)).view_as(out)
    out = fwAD.make_dual(out, tangent)
    return (out, indices) if self.return_indices else out


def _linear_map_forward(self, x: Tensor) -> Tensor:
    """A module linear in its input (average pooling): the same map on the primal and on the tangent."""
    x_p, x_t = _unpack(x)
    if x_t is None:
        return type(self).forward(self, x)
    out = type(self).forward(self, x_p)
    with torch.no_grad():
        tangent = type(self).forward(self, x_t)
    return fwAD.make_dual(out, tangent)


def _batchnorm_forward(self, x: Tensor) -> Tensor:
    """_BatchNorm: torch's own BatchNorm kernel on the primals, closed-form tangent (module doc)."""
    x_p, x_t = _unpack(x)
    w_p, w_t = _unpack(self.weight)
    b_p, b_t = _unpack(self.bias)
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    if (x_t is None and w_t is None and b_t is None) or not bn_training:
        return type(self).forward(self, x)  # eval mode: the tangent is affine, the generic rule is cheap
    # the bookkeeping of _BatchNorm.forward, so running statistics move exactly as there
    self._check_input_dim(x_p)
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    tracked = not self.training or self.track_running_stats
    running_mean, running_var = (self.running_mean, self.running_var) if tracked else (None, None)
    if x_p.numel() // x_p.shape[1] == 1:  # as F.batch_norm: one value per channel has no variance
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x_p.size()}")
    # what F.batch_norm runs, also returning the batch statistics it computed
    out, save_mean, save_invstd, reserve, impl = torch._batch_norm_impl_index(
        x_p, w_p, b_p, running_mean, running_var, True, momentum, self.eps, torch.backends.cudnn.enabled)
    with torch.no_grad():
        tangent = _batchnorm_tangent(x_p, x_t, w_p, w_t, b_t, save_mean, save_invstd, reserve, impl, self.eps)
    return fwAD.make_dual(out, tangent)


def _batchnorm_tangent(x, x_t, w, w_t, b_t, mean, invstd, reserve, impl, eps):
    """dy (shape of x) of training-mode BatchNorm, from its saved batch statistics (C,), (C,)."""
    channels = x.shape[1]
    shape = (1, channels) + (1,) * (x.dim() - 2)  # broadcasts a (C,) over x
    stat = torch.promote_types(mean.dtype, torch.float32)  # coefficients in fp32 at least, as PyTorch does
    weight = w.detach() if w is not None else torch.ones(channels, dtype=mean.dtype, device=x.device)
    gamma = weight.to(stat)
    zero = torch.zeros(channels, dtype=stat, device=x.device)
    d_gamma = w_t.to(stat) if w_t is not None else zero
    d_beta = b_t.to(stat) if b_t is not None else zero
    if x_t is None:
        coef_xhat, offset, scale = d_gamma, d_beta, None
    else:
        count = x.numel() // channels
        # one fused pass of the native backward kernel: grad_bias = sum(g), grad_weight = sum(g * xhat)
        _, sum_xhat, sum_1 = torch.ops.aten._batch_norm_impl_index_backward(
            impl, x, x_t.to(x.dtype), weight, None, None, mean, invstd, True, eps, [False, True, True], reserve)
        scale = gamma * invstd  # (C,): gamma / sqrt(var + eps)
        # dy = scale * (dx - mean(dx)) + (d gamma - scale * mean(dx * xhat)) * xhat + d beta
        coef_xhat = d_gamma - scale * (sum_xhat.to(stat) / count)
        offset = d_beta - scale * (sum_1.to(stat) / count)
    # coef_xhat * xhat + offset in one native pass: BatchNorm in eval mode with the batch's own
    # statistics, var + 0 = 1 / invstd^2
    dy = torch.batch_norm(x, coef_xhat, offset, mean.to(stat), invstd.to(stat).pow(-2), False, 0.0, 0.0,
                          torch.backends.cudnn.enabled)
    if scale is not None:
        dy = dy.addcmul_(x_t, scale.reshape(shape))
    return dy


_RULES = (
    (nn.modules.batchnorm._BatchNorm, nn.modules.batchnorm._BatchNorm.forward, _batchnorm_forward),
    (nn.Conv1d, nn.Conv1d.forward, _conv_forward),
    (nn.Conv2d, nn.Conv2d.forward, _conv_forward),
    (nn.Conv3d, nn.Conv3d.forward, _conv_forward),
    (nn.Linear, nn.Linear.forward, _linear_forward),
    (nn.ReLU, nn.ReLU.forward, _relu_forward),
    (nn.MaxPool2d, nn.MaxPool2d.forward, _maxpool_forward),
    (nn.AvgPool2d, nn.AvgPool2d.forward, _linear_map_forward),
    (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool2d.forward, _linear_map_forward),
)


def _rule(module: nn.Module):
    """The fast forward for ``module``, or None where its forward is not torch's stock one."""
    if isinstance(module, LazyModuleMixin) or "forward" in vars(module):
        return None
    for cls, stock, fast in _RULES:
        if isinstance(module, cls) and type(module).forward is stock:
            return fast
    return None


@contextlib.contextmanager
def fast_tangents(model: nn.Module):
    """Within the block, the BatchNorm, convolution and linear layers of ``model`` run fast tangent rules.

    Outputs, gradients and running statistics are those of the plain modules; only how a tangent
    is computed changes (see the module docstring). A no-op under :func:`native_tangents`.

    Parameters
    ----------
    model : nn.Module
        Its submodules (``model.modules()``) are swapped and restored on exit, even on error.

    Examples
    --------
    >>> import torch, torch.autograd.forward_ad as fwAD
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    >>> x = torch.randn(8, 1, 6, 6)
    >>> with fwAD.dual_level(), fast_tangents(net):
    ...     out, tangent = fwAD.unpack_dual(net(fwAD.make_dual(x, torch.randn_like(x))))
    >>> tangent.shape
    torch.Size([8, 4, 4, 4])
    """
    swapped = []
    if not getattr(_STATE, "native", False):
        for m in model.modules():
            fast = _rule(m)
            if fast is not None:
                m.forward = types.MethodType(fast, m)
                swapped.append(m)
    try:
        yield model
    finally:
        for m in swapped:
            del m.forward


@contextlib.contextmanager
def native_tangents():
    """Within the block, :func:`fast_tangents` does nothing: PyTorch's generic rules run (benchmarks, tests)."""
    before = getattr(_STATE, "native", False)
    _STATE.native = True
    try:
        yield
    finally:
        _STATE.native = before
