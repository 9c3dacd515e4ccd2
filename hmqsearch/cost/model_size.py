"""Whole-model parameter bytes: what a user compares against the float model's file.

The quantized layers' weights count at their bit-widths (:mod:`hmqsearch.cost.size`); every
other parameter tensor of the prepared network (biases, normalization parameters, bare
parameters such as position embeddings, layers left float: :meth:`QuantModel.float_parameters`)
counts at 32 bits.  The reference is the original model's parameters at 32 bits
(``QuantModel.model_float_bytes``; batch norms folded at preparation count there, not here).
Buffers (batch-norm running statistics) and the per-channel scale exponents are not parameters
and are not counted (the scales are reported as ``overhead_bytes_packed``).
"""

from __future__ import annotations

from hmqsearch.cost import size
from hmqsearch.quant.prepare import FLOAT_PARAM_BYTES, QuantModel


def fixed_float_bytes(qmodel: QuantModel) -> int:
    """32-bit bytes of every parameter that is not a quantized layer's weight (constant during the search)."""
    quantizer_ids = {id(p) for _, q in qmodel.quantizers() for p in q.parameters()}
    layer_weight_ids = {id(layer.weight) for _, layer in qmodel.layers()}
    return FLOAT_PARAM_BYTES * sum(
        p.numel() for p in qmodel.net.parameters() if id(p) not in quantizer_ids and id(p) not in layer_weight_ids
    )


def model_bytes(qmodel: QuantModel, basis: str = "packed") -> int:
    """Exact whole-model parameter bytes of the argmax assignment."""
    return sum(size.exact_weight_bytes(qmodel, basis).values()) + fixed_float_bytes(qmodel)


def model_compression(qmodel: QuantModel, basis: str = "packed") -> float:
    """The float model's parameter bytes over the quantized model's."""
    return qmodel.model_float_bytes / model_bytes(qmodel, basis)
