"""Power-of-two uniform quantization: the numerics every part of hmqsearch agrees on.

For a scheme (b, t) with t = 2^m:

* signed:   step d = t / 2^(b-1),  q = clamp(round(x / d), -2^(b-1), 2^(b-1) - 1)
* unsigned: step d = t / 2^b,      q = clamp(round(x / d), 0, 2^b - 1)

The dequantized value is q * d, rounding is half-to-even (``torch.round``).

All fake quantizers here are written as ``step * round(clamp(x, lo, hi) / step)`` with
``lo = qmin * step`` and ``hi = qmax * step``.  For a power-of-two step this equals the
integer formula above bit for bit (division by a power of two is exact and ``lo``/``hi``
are integer multiples of the step), and it also covers the search-time relaxation where
step, ``lo`` and ``hi`` are *expectations* under the Gumbel-Softmax weights and therefore
not powers of two.  Gradients (straight-through estimator):

* d out / d x    = 1 where lo <= x <= hi, else 0
* d out / d step = round(u) - u with u = clamp(x, lo, hi) / step
* d out / d hi   = 1 where x > hi;   d out / d lo = 1 where x < lo

The CUDA kernels in :mod:`hmqsearch.kernels` implement exactly these formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (qmin, qmax) of a ``bits``-wide signed or unsigned tensor."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def step_size(threshold: Tensor | float, bits: int, signed: bool) -> Tensor | float:
    """Quantization step of scheme (bits, threshold): t / 2^(b-1) signed, t / 2^b unsigned."""
    return threshold / 2 ** (bits - 1 if signed else bits)


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quant_ref(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Reference fake quantizer ``step * round(clamp(x, lo, hi) / step)`` with STE rounding.

    ``step``, ``lo`` and ``hi`` broadcast against ``x`` (scalars for per-tensor, shaped
    ``[C, 1, ...]`` for per-channel).  Autograd yields the gradients listed in the module
    docstring.  NaN inputs propagate as NaN; +/-inf clamp to ``hi``/``lo``.
    """
    clipped = torch.minimum(torch.maximum(x, lo), hi)
    # torch.clamp drops NaN on some backends; minimum/maximum propagate it.
    return round_ste(clipped / step) * step


def quantize_to_int(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    """Integer codes q (as int32) of ``x`` for a power-of-two ``step``: clamp(round(x / d))."""
    qmin, qmax = int_range(bits, signed)
    return torch.clamp(torch.round(x / step), qmin, qmax).to(torch.int32)


def fake_quant_pot(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    """Fake quantization with a discrete (bits, step): q * d with the integer range clamp."""
    qmin, qmax = int_range(bits, signed)
    return fake_quant_ref(x, step, step * qmin, step * qmax)


def channel_view(t: Tensor, ndim: int, axis: int) -> Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)
