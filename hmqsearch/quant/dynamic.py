"""Dynamic per-tensor input quantization: the range is measured on every batch at inference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmqsearch.quant.calibration import MIN_RANGE
from hmqsearch.quant.functional import fake_quant_pot, step_size


class DynamicInputQuantizer(nn.Module):
    """Quantizes each batch with threshold 2^ceil(log2 max|x|) of that batch (power of two, as
    every scale here), unsigned when the batch has no negative value."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        amax = x.detach().abs().amax().clamp(min=MIN_RANGE)
        signed = bool((x.detach() < 0).any())
        threshold = torch.exp2(torch.ceil(torch.log2(amax)))
        return fake_quant_pot(x, step_size(threshold, self.bits, signed), self.bits, signed)
