"""Exact and expected weight memory of a prepared model.

Two accountings (DESIGN.md "Export"):

* **packed**: every weight at its bit-width, densely packed (ceil(n * b / 8) bytes per layer),
  one int8 exponent per power-of-two scale, biases as 32-bit values.  This is what the packed
  checkpoint stores and what budgets apply to by default.
* **container**: what the ONNX graph stores: int8 for 5-8 bits, int4 (two per byte) for 1-4
  bits, float32 scales, 32-bit biases.

A layer whose weights are pinned to float counts 4 bytes per weight in both.
The float32 reference (for ``budget.weight_compression``) is 4 bytes per weight and bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hmqsearch.quant.layers import QuantConv2d, QuantLinear
from hmqsearch.quant.prepare import QuantModel

FLOAT_BYTES = 4
SCALE_EXP_BYTES = 1  # power-of-two scale stored as its int8 exponent
SCALE_FLOAT_BYTES = 4
BIAS_BYTES = 4
BASES = ("packed", "container")


def _bias_bytes(layer: QuantConv2d | QuantLinear) -> int:
    return BIAS_BYTES * layer.bias.numel() if layer.bias is not None else 0


def container_bits(bits: int) -> int:
    """Storage bits of a ``bits``-wide value in the deployment graph: int4 for 1-4, int8 for 5-8."""
    return 4 if bits <= 4 else 8


def layer_weight_bytes(layer: QuantConv2d | QuantLinear, bits: int | None, basis: str = "packed") -> int:
    """Exact bytes of one layer's weights at ``bits`` (None = float32)."""
    n = layer.weight.numel()
    if bits is None:
        return FLOAT_BYTES * n + _bias_bytes(layer)
    scales = layer.wq.base_exp.numel()
    if basis == "packed":
        return math.ceil(n * bits / 8) + SCALE_EXP_BYTES * scales + _bias_bytes(layer)
    return math.ceil(n * container_bits(bits) / 8) + SCALE_FLOAT_BYTES * scales + _bias_bytes(layer)


def weight_bits(layer: QuantConv2d | QuantLinear) -> int | None:
    """Bit-width of the layer's argmax weight scheme (None when its weights stay float)."""
    return None if layer.wq.float_pinned else layer.wq.scheme().bits


def exact_weight_bytes(qmodel: QuantModel, basis: str = "packed") -> dict[str, int]:
    """Per-layer exact weight bytes of the argmax assignment."""
    return {name: layer_weight_bytes(layer, weight_bits(layer), basis) for name, layer in qmodel.layers()}


def expected_weight_bytes(qmodel: QuantModel, basis: str = "packed") -> Tensor:
    """Expected total bytes under softmax(logits); differentiable w.r.t. the logits."""
    terms = []
    for _, layer in qmodel.layers():
        bits = layer.wq.bits
        if layer.wq.float_pinned:
            terms.append(bits.new_tensor(float(layer_weight_bytes(layer, None))))
            continue
        per_bit = bits.new_tensor([layer_weight_bytes(layer, int(b), basis) for b in bits.tolist()])
        if basis == "packed":  # drop the ceil so the expectation is linear in E[bits]
            n = layer.weight.numel()
            per_bit = per_bit - torch.ceil(n * bits / 8) + n * bits / 8
        terms.append((layer.wq.bit_probs() * per_bit).sum())
    return torch.stack(terms).sum()


def min_weight_bytes(qmodel: QuantModel, basis: str = "packed") -> int:
    """Bytes with every searched layer at its lowest candidate bit-width (pins respected)."""
    return sum(
        layer_weight_bytes(layer, None if layer.wq.float_pinned else int(layer.wq.bits.min()), basis)
        for _, layer in qmodel.layers()
    )


def float_weight_bytes(qmodel: QuantModel) -> int:
    """float32 bytes of the quantized layers' weights and biases: the compression reference."""
    return sum(layer_weight_bytes(layer, None) for _, layer in qmodel.layers())
