"""Power-of-two uniform quantization: the numerics every part of hmqsearch agrees on.

For a scheme (b, t) with t = 2^m:

* signed:   step d = t / 2^(b-1),  q = clamp(round(x / d), -2^(b-1), 2^(b-1) - 1)
* unsigned: step d = t / 2^b,      q = clamp(round(x / d), 0, 2^b - 1)

The dequantized value is q * d, rounding is half-to-even (``torch.round``).

One exception: a *signed 1-bit* scheme, whose integer grid would degenerate to {-1, 0}, uses
the symmetric binary grid instead: d = t / 2, q = +1 where x >= 0 and -1 elsewhere, so the
two levels are +-t/2 (a power of two, stored as one bit per weight: 1 for +1, 0 for -1, and as
the int4 values +-1 in the ONNX graph, exactly). Its straight-through gradient is 1 inside
the clipping range [-t, t] and 0 outside; the gradient to the step is q (see
:func:`binary_quant`).

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


def is_binary(bits: int, signed: bool) -> bool:
    """Whether (bits, signed) is the symmetric binary grid {-1, +1} rather than an integer range."""
    return bits == 1 and signed


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (qmin, qmax) of a ``bits``-wide signed or unsigned tensor ({-1, +1} for
    the binary grid, whose codes are never 0)."""
    if is_binary(bits, signed):
        return -1, 1
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def step_shift(bits: int, signed: bool) -> int:
    """log2(t / d): b - 1 signed, b unsigned, 1 for the binary grid (d = t / 2)."""
    return 1 if is_binary(bits, signed) else (bits - 1 if signed else bits)


def step_size(threshold: Tensor | float, bits: int, signed: bool) -> Tensor | float:
    """Quantization step of scheme (bits, threshold): t / 2^(b-1) signed, t / 2^b unsigned,
    t / 2 binary."""
    return threshold / 2 ** step_shift(bits, signed)


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


def binary_quant(x: Tensor, step: Tensor) -> Tensor:
    """Symmetric binary fake quantizer: ``step * (+1 if x >= 0 else -1)``.

    Straight-through gradient to ``x`` inside the clipping range [-2 step, 2 step] (the
    threshold t = 2 step), zero outside; the gradient to ``step`` is the sign. ``step``
    broadcasts against ``x`` like :func:`fake_quant_ref`'s. NaN inputs propagate as NaN.
    """
    clipped = torch.minimum(torch.maximum(x, -2 * step), 2 * step)
    levels = torch.where(x >= 0, step, -step)
    return torch.where(torch.isnan(x), x, levels + (clipped - clipped.detach()))


def quantize_to_int(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    """Integer codes q (as int32) of ``x`` for a power-of-two ``step``: clamp(round(x / d)),
    or the sign (+-1) on the binary grid."""
    if is_binary(bits, signed):
        return torch.where(x >= 0, 1, -1).to(torch.int32)
    qmin, qmax = int_range(bits, signed)
    return torch.clamp(torch.round(x / step), qmin, qmax).to(torch.int32)


def fake_quant_pot(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    """Fake quantization with a discrete (bits, step): q * d with the integer range clamp."""
    if is_binary(bits, signed):
        return binary_quant(x, step)
    qmin, qmax = int_range(bits, signed)
    return fake_quant_ref(x, step, step * qmin, step * qmax)
