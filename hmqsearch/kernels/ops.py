"""The fake-quant custom operators (namespace ``hmqsearch``) and the public ``fake_quant``.

``hmqsearch::fake_quant`` and ``hmqsearch::fake_quant_backward`` are ``torch.library``
custom ops with fake (meta) implementations and autograd, so they trace under
``torch.compile`` as single opaque nodes.  Each call runs the compiled extension when
:mod:`hmqsearch.kernels.backend` provides one for the tensor's device and dtype, else
:mod:`hmqsearch.kernels.torch_impl`; both have the same numerics.

In eager mode the Python custom op's dispatch is too slow (``fake_quant`` forward and backward
of a 64 x 64 tensor on the 2-core CI CPU: 225 us through it, 118 us through a plain
``torch.autograd.Function``), paid twice per quantized layer and step, and on a GPU that host
time, not the kernels, bounds a small network's step. So an eager call runs
``torch.ops.<extension>.fake_quant``, the op each extension registers in C++ with its autograd
in C++ (``fake_quant_library.h``), when an extension serves the tensor's device and dtype, and
the same implementations through :class:`_EagerFakeQuant` (a ``torch.autograd.Function``)
otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import hmqsearch.kernels.backend as backend
import hmqsearch.kernels.torch_impl as torch_impl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _forward(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, axis: int | None) -> Tensor:
    ext = backend.extension_for(x.device.type, x.dtype)
    if ext is None:
        return torch_impl.forward(x, step, lo, hi, axis)
    return ext.forward(x, step, lo, hi, axis)


def _backward_impl(
    grad: Tensor, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, axis: int | None, param_grads: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ext = backend.extension_for(x.device.type, x.dtype)
    if ext is None:
        return torch_impl.backward(grad, x, step, lo, hi, axis, param_grads)
    return ext.backward(grad, x, step, lo, hi, axis, param_grads)


def _input_grads(grads: tuple[Tensor, ...], needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients autograd asked for (None for the others), and None for ``axis``."""
    return *(g if need else None for g, need in zip(grads, needs)), None


@torch.library.custom_op("hmqsearch::fake_quant", mutates_args=())
def fake_quant_op(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, axis: int | None) -> Tensor:
    """Fake quantization with float32 step/lo/hi: 0-dim (axis None) or (x.shape[axis],)."""
    return _forward(x, step, lo, hi, axis)


@fake_quant_op.register_fake
def _fake_quant_fake(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, axis: int | None) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("hmqsearch::fake_quant_backward", mutates_args=())
def fake_quant_backward_op(
    grad: Tensor,
    x: Tensor,
    step: Tensor,
    lo: Tensor,
    hi: Tensor,
    axis: int | None,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_step, grad_lo, grad_hi); parameter gradients are zeros unless param_grads."""
    return _backward_impl(grad, x, step, lo, hi, axis, param_grads)


@fake_quant_backward_op.register_fake
def _fake_quant_backward_fake(
    grad: Tensor,
    x: Tensor,
    step: Tensor,
    lo: Tensor,
    hi: Tensor,
    axis: int | None,
    param_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(step), torch.empty_like(lo), torch.empty_like(hi)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, step, lo, hi, axis = inputs
    ctx.save_for_backward(x, step, lo, hi)
    ctx.axis = axis


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, step, lo, hi = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = fake_quant_backward_op(grad, x, step, lo, hi, ctx.axis, any(needs[1:]))
    return _input_grads(grads, needs)


fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFakeQuant(torch.autograd.Function):
    """``fake_quant_op`` with its autograd, without the custom op's dispatch (eager mode only)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, axis: int | None) -> Tensor:
        _setup_context(ctx, (x, step, lo, hi, axis), None)
        return _forward(x, step, lo, hi, axis)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, step, lo, hi = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        return _input_grads(_backward_impl(grad, x, step, lo, hi, ctx.axis, any(needs[1:])), needs)


@functools.cache
def _library_op(ext: ModuleType) -> Callable[..., Tensor]:
    """The extension's C++ op with C++ autograd (its overload, skipping overload resolution)."""
    return getattr(torch.ops, ext.library).fake_quant.default


def _eager_op(x: Tensor) -> Callable[..., Tensor]:
    """What an eager call on ``x`` runs: the C++ op of the extension serving x's device and dtype,
    else the Python Function over the PyTorch implementation."""
    ext = backend.extension_for(x.device.type, x.dtype)
    return _EagerFakeQuant.apply if ext is None else _library_op(ext)


def _param(value: Tensor | float, x: Tensor, channels: int | None, name: str) -> Tensor:
    """value as a float32 tensor on x's device: 0-dim if it has one element, else (channels,)."""
    if isinstance(value, Tensor):
        t = value.to(device=x.device, dtype=torch.float32)
    else:
        t = torch.tensor(value, device=x.device, dtype=torch.float32)
    if t.numel() == 1:
        return t.reshape(())
    if channels is None or t.shape != (channels,):
        expected = "one element" if channels is None else f"one element or shape ({channels},)"
        raise ValueError(f"fake_quant: {name} needs {expected}, got shape {tuple(t.shape)}")
    return t


def fake_quant(
    x: Tensor,
    step: Tensor | float,
    lo: Tensor | float,
    hi: Tensor | float,
    axis: int | None = None,
) -> Tensor:
    """``step * round(clamp(x, lo, hi) / step)``, differentiable w.r.t. x, step, lo and hi.

    Per tensor (``axis=None``) step/lo/hi have one element; per channel (``axis`` any,
    negative allowed) each is a scalar or a vector of length ``x.shape[axis]``.  Equals
    :func:`hmqsearch.quant.functional.fake_quant_ref` bit for bit in float32; float16 and
    bfloat16 inputs are computed in float32 and the output has x's dtype.  Rounding is half to
    even; NaN stays NaN; +inf/-inf give hi/lo.  Gradients (straight-through estimator):
    grad_x = g where lo <= x <= hi else 0; grad_step = sum g * (round(u) - u) with
    u = clamp(x, lo, hi) / step; grad_lo = sum g where x < lo; grad_hi = sum g where x > hi.
    At x == lo or x == hi exactly the whole g goes to x (autograd through the reference's
    maximum/minimum would split it in halves between x and the bound).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fake_quant: x must be float32, float16 or bfloat16, got {x.dtype}")
    channels = None
    if axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"fake_quant: axis {axis} out of range for a {x.dim()}-d input")
        axis %= x.dim()
        channels = x.shape[axis]
    params = [_param(v, x, channels, n) for v, n in ((step, "step"), (lo, "lo"), (hi, "hi"))]
    if all(p.dim() == 0 for p in params):
        axis = None
    else:
        params = [p.expand(channels) for p in params]
    op = fake_quant_op if torch.compiler.is_compiling() else _eager_op(x)
    return op(x, *params, axis)
