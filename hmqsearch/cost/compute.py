"""Compute and activation-memory costs: the budgets that give the input quantizers a reason.

* **BOPs** (bit operations, the compute measure of mixed-precision papers): per sample, the sum
  over layers of MACs x weight bits x input bits. A tensor left in float counts 32 bits.
* **Activation memory**: the largest single layer input, in bytes at its bit-width, per sample
  (what a microcontroller must hold for one layer). A float input counts 4 bytes a value.

Each has an exact cost (the argmax assignment), a differentiable expected cost under the
logits (E[bw] E[ba] per layer for BOPs, which are independent; the largest expected input for
memory, whose gradient goes to that layer's input quantizer) and a minimum (the lowest
candidates everywhere, pins respected). MACs and input sizes are those recorded by
:func:`hmqsearch.quant.prepare.prepare` on the example batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel

FLOAT_BITS = 32


def _exact_bits(q: HMQQuantizer) -> int:
    scheme = q.argmax()
    return FLOAT_BITS if scheme is None else scheme.bits


def _min_bits(q: HMQQuantizer) -> int:
    return FLOAT_BITS if q.float_pinned else q.candidate_bits[0]


def _expected_bits(q: HMQQuantizer) -> Tensor:
    if q.float_pinned:
        return q.bits.new_full((), float(FLOAT_BITS))
    return q.expected_bits()


def _largest_input(layer) -> int:
    """Values in the largest single input of ``layer`` (per sample) over its calls."""
    return max((math.prod(s) for s in layer.shape.input_shapes), default=0)


def float_bops(qmodel: QuantModel) -> float:
    """BOPs of the float32 model (32 x 32 bits per MAC): the reference of ``bops_compression``."""
    return float(sum(layer.shape.macs for _, layer in qmodel.layers())) * FLOAT_BITS * FLOAT_BITS


def exact_bops(qmodel: QuantModel) -> float:
    return float(sum(layer.shape.macs * _exact_bits(layer.wq) * _exact_bits(layer.aq) for _, layer in qmodel.layers()))


def min_bops(qmodel: QuantModel) -> float:
    return float(sum(layer.shape.macs * _min_bits(layer.wq) * _min_bits(layer.aq) for _, layer in qmodel.layers()))


def expected_bops(qmodel: QuantModel) -> Tensor:
    """Differentiable BOPs: sum over layers of MACs x E[weight bits] x E[input bits]."""
    return torch.stack([
        layer.shape.macs * _expected_bits(layer.wq) * _expected_bits(layer.aq) for _, layer in qmodel.layers()
    ]).sum()


def exact_activation_bytes(qmodel: QuantModel) -> float:
    return max(_largest_input(layer) * _exact_bits(layer.aq) / 8 for _, layer in qmodel.layers())


def min_activation_bytes(qmodel: QuantModel) -> float:
    return max(_largest_input(layer) * _min_bits(layer.aq) / 8 for _, layer in qmodel.layers())


def expected_activation_bytes(qmodel: QuantModel) -> Tensor:
    """The largest expected layer input in bytes (a max: its gradient reaches that layer)."""
    return torch.stack([
        _largest_input(layer) * _expected_bits(layer.aq) / 8 for _, layer in qmodel.layers()
    ]).max()
