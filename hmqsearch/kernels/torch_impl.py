"""Plain PyTorch fake-quant forward and backward, numerically identical to the CUDA kernels.

The forward repeats :func:`hmqsearch.quant.functional.fake_quant_ref` operation by operation
(maximum, minimum, division, straight-through round half to even, multiplication) in float32,
so it equals the reference bit for bit; float16/bfloat16 inputs are computed in float32 and
rounded once at the end.  Outputs have the strides of ``torch.empty_like(x)`` like the CUDA path.

Both functions take ``step``/``lo``/``hi`` as float32 tensors: 0-dim for per-tensor
(``axis=None``), shape ``(x.shape[axis],)`` per channel, ``axis`` non-negative.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_view(t: Tensor, ndim: int, axis: int) -> Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _views(x: Tensor, axis: int | None, *params: Tensor) -> list[Tensor]:
    return [p if axis is None else channel_view(p, x.dim(), axis) for p in params]


def _clip_div(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """u = minimum(maximum(x, lo), hi) / step in a fresh float32 tensor shaped like x."""
    u = torch.empty_like(x, dtype=torch.float32)
    torch.maximum(x.float(), lo, out=u)
    torch.minimum(u, hi, out=u)
    return u.div_(step)


def forward(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, axis: int | None) -> Tensor:
    """step * round(clamp(x, lo, hi) / step) with NaN propagation, in x's dtype.

    The rounding is u + (round(u) - u) as in the reference's ``round_ste``: it differs from
    round(u) in the sign of zero (always +0) and for infinite u (NaN).
    """
    step, lo, hi = _views(x, axis, step, lo, hi)
    u = _clip_div(x, step, lo, hi)
    return u.add_(torch.round(u).sub_(u)).mul_(step).to(x.dtype)


def _sum_to(t: Tensor, param: Tensor, axis: int | None) -> Tensor:
    """Sum of t over every dimension but the channel axis, shaped like param."""
    if axis is None:
        return t.sum().reshape(param.shape)
    dims = [d for d in range(t.dim()) if d != axis]
    return (t.sum(dims) if dims else t).reshape(param.shape)


def backward(
    grad: Tensor,
    x: Tensor,
    step: Tensor,
    lo: Tensor,
    hi: Tensor,
    axis: int | None,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Straight-through gradients (grad_x, grad_step, grad_lo, grad_hi).

    grad_x = grad where lo <= x <= hi (0 outside and for NaN x); grad_step sums
    grad * (round(u) - u) with u = clamp(x, lo, hi) / step; grad_lo / grad_hi sum grad where
    x < lo / x > hi.  Sums are float32, per channel or per tensor.  With ``param_grads``
    False the parameter gradients are returned as zeros without being computed.
    """
    s, l, h = _views(x, axis, step, lo, hi)
    xf = x.float()
    grad_x = torch.empty_like(x)
    torch.where((xf >= l) & (xf <= h), grad, grad.new_zeros(()), out=grad_x)
    if not param_grads:
        return grad_x, torch.zeros_like(step), torch.zeros_like(lo), torch.zeros_like(hi)
    gf = grad.float()
    u = _clip_div(x, s, l, h)
    grad_step = _sum_to(torch.round(u).sub_(u).mul_(gf), step, axis)
    grad_lo = _sum_to(torch.where(xf < l, gf, 0), lo, axis)
    grad_hi = _sum_to(torch.where(xf > h, gf, 0), hi, axis)
    return grad_x, grad_step, grad_lo, grad_hi
