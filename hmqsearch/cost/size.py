"""Exact and expected weight memory of a prepared model.

Weight bytes are the bytes of the weight tensors themselves, as compression papers count
them (so 2-bit weights are exactly 16x smaller than float32).  Two accountings:

* **packed**: every weight at its bit-width, densely packed: ceil(n * b / 8) bytes per layer.
  Budgets apply to these by default.
* **container**: what the ONNX graph stores: int8 for 5-8 bits, int4 (two per byte) for 1-4.

A layer whose weights are pinned to float counts 4 bytes per weight in both.  The per-layer
overhead that both the packed checkpoint and the graph also store (one scale per output
channel: an int8 exponent packed, float32 in ONNX; 32-bit biases) is reported separately by
:func:`overhead_bytes`.  The float32 reference for ``budget.weight_compression`` is 4 bytes
per weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hmqsearch.quant.layers import QuantConv2d, QuantLinear
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.quant.scheme import INT4_MAX_BITS, container_bits

FLOAT_BYTES = 4
SCALE_EXP_BYTES = 1  # power-of-two scale stored as its int8 exponent
SCALE_FLOAT_BYTES = 4
BIAS_BYTES = 4
BASES = ("packed", "container")


def _bias_bytes(layer: QuantConv2d | QuantLinear) -> int:
    return BIAS_BYTES * layer.bias.numel() if layer.bias is not None else 0


def layer_weight_bytes(layer: QuantConv2d | QuantLinear, bits: int | None, basis: str = "packed") -> int:
    """Exact bytes of one layer's weight tensor at ``bits`` (None = float32)."""
    n = layer.weight.numel()
    if bits is None:
        return FLOAT_BYTES * n
    return math.ceil(n * (bits if basis == "packed" else container_bits(bits)) / 8)


def overhead_bytes(qmodel: QuantModel, basis: str = "packed") -> int:
    """Scales and biases of the quantized layers (stored beside the weights, not budgeted)."""
    scale_bytes = SCALE_EXP_BYTES if basis == "packed" else SCALE_FLOAT_BYTES
    return sum(
        (0 if layer.wq.float_pinned else scale_bytes * layer.wq.base_exp.numel()) + _bias_bytes(layer)
        for _, layer in qmodel.layers()
    )


def weight_bits(layer: QuantConv2d | QuantLinear) -> int | None:
    """Bit-width of the layer's argmax weight scheme (None when its weights stay float)."""
    scheme = layer.wq.argmax()
    return None if scheme is None else scheme.bits


def exact_weight_bytes(qmodel: QuantModel, basis: str = "packed") -> dict[str, int]:
    """Per-layer exact weight bytes of the argmax assignment."""
    return {name: layer_weight_bytes(layer, weight_bits(layer), basis) for name, layer in qmodel.layers()}


def expected_weight_bytes(qmodel: QuantModel, basis: str = "packed") -> Tensor:
    """Expected total bytes under softmax(logits); differentiable w.r.t. the logits."""
    terms = []
    for _, layer in qmodel.layers():
        bits = layer.wq.bits
        # tensor ops on the device only: a host-built tensor would wait for the GPU every step
        if layer.wq.float_pinned:
            terms.append(bits.new_full((), float(layer_weight_bytes(layer, None))))
            continue
        if basis == "packed":  # drop the ceil so the expectation is linear in E[bits]
            per_bit = layer.weight.numel() * bits / 8
        else:
            int4, int8 = (float(layer_weight_bytes(layer, b, basis)) for b in (INT4_MAX_BITS, 8))
            per_bit = torch.where(bits <= INT4_MAX_BITS, int4, int8)
        terms.append((layer.wq.bit_probs() * per_bit).sum())
    return torch.stack(terms).sum()


def min_weight_bytes(qmodel: QuantModel, basis: str = "packed") -> int:
    """Bytes with every searched layer at its lowest candidate bit-width (pins respected)."""
    return sum(
        layer_weight_bytes(layer, None if layer.wq.float_pinned else int(layer.wq.bits.min()), basis)
        for _, layer in qmodel.layers()
    )


def float_weight_bytes(qmodel: QuantModel) -> int:
    """float32 bytes of the quantized layers' weights: the compression reference."""
    return sum(layer_weight_bytes(layer, None) for _, layer in qmodel.layers())
