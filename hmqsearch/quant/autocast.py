"""Quantization math in float32 under mixed precision (``trainer.precision=bf16-mixed``).

Autocast runs matmuls in bfloat16, among them a quantizer's expected step and clipping bounds
(``pi @ step``): the relaxed quantizer would round to a bf16-rounded grid. A quantizer wrapped
here computes with autocast off, on a float32 copy of its input, so its output is float32 and
equal to the result without autocast; the layer around it still runs its convolution or
matmul in bfloat16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def float32_under_autocast(forward: Callable[[M, Tensor], Tensor]) -> Callable[[M, Tensor], Tensor]:
    """Decorate a module's ``forward(self, x)`` to run in float32 with autocast disabled
    whenever autocast is on for ``x``'s device (unchanged otherwise)."""

    @functools.wraps(forward)
    def wrapper(self: M, x: Tensor) -> Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return forward(self, x)
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x.float())

    return wrapper
