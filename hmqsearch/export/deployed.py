"""The deployed form of each quantized layer: integer weight codes, power-of-two steps, schemes.

This is the single place where a fixed-state :class:`QuantModel` is turned into integers; the
ONNX graph, the packed checkpoint and the profiler all read it.  Codes are computed with
:func:`hmqsearch.quant.functional.quantize_to_int`, which for power-of-two steps equals the
fake quantizer's ``step * round(clamp(x, lo, hi) / step)`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from hmqsearch.errors import UserError
from hmqsearch.kernels.torch_impl import channel_view
from hmqsearch.quant.assignment import Assignment, LayerSchemes
from hmqsearch.quant.functional import quantize_to_int
from hmqsearch.quant.layers import QuantConv1d, QuantConv2d, QuantEmbedding
from hmqsearch.quant.prepare import QuantLayer, QuantModel
from hmqsearch.quant.scheme import Scheme


@dataclass
class DeployedLayer:
    """One Conv1d/Conv2d/Linear/Embedding as deployed: float or integer weights, an optional input scheme."""

    name: str
    kind: str  # "conv" (1-D or 2-D: the weight's rank says), "linear" or "embedding" (no input scheme)
    weight: np.ndarray  # float32, the dequantized weights when quantized (q * step)
    float_weight: np.ndarray  # float32, the layer's own (unquantized) weights
    codes: np.ndarray | None  # int32 weight codes, None when the weights stay float
    wscheme: Scheme | None
    ascheme: Scheme | None  # None: the input stays float
    bias: np.ndarray | None
    stride: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)  # ONNX order: begins then ends
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    channel_scale: np.ndarray | None = None  # float32 per output channel: a batch norm folded in (bn_fold.py)

    def at_bits(self, w_bits: int | None, a_bits: int | None) -> "DeployedLayer":
        """The same layer quantized at other bit-widths (None = float), same thresholds."""
        if self.channel_scale is not None:
            raise ValueError(f"{self.name}: choose bit-widths before folding a batch norm in")
        wscheme = None if w_bits is None or self.wscheme is None else self.wscheme.at_bits(w_bits)
        ascheme = None if a_bits is None or self.ascheme is None else self.ascheme.at_bits(a_bits)
        codes = None if wscheme is None else quantize_codes(torch.from_numpy(self.float_weight), wscheme)
        weight = self.float_weight if wscheme is None else dequantize_codes(codes, wscheme)
        return replace(self, weight=weight, codes=codes, wscheme=wscheme, ascheme=ascheme)


def quantize_codes(weight: torch.Tensor, scheme: Scheme) -> np.ndarray:
    """Integer codes clamp(round(w / step)) with per-output-channel (axis 0) or scalar steps."""
    steps = torch.from_numpy(scheme.steps)
    step = channel_view(steps, weight.dim(), 0) if steps.numel() > 1 else steps.reshape(())
    return quantize_to_int(weight.detach().float().cpu(), step, scheme.bits, scheme.signed).numpy()


def dequantize_codes(codes: np.ndarray, scheme: Scheme) -> np.ndarray:
    steps = scheme.steps
    if steps.size > 1:
        steps = steps.reshape((-1,) + (1,) * (codes.ndim - 1))
    return (codes.astype(np.float32) * steps).astype(np.float32)


def _conv_pads(layer: QuantConv1d | QuantConv2d) -> tuple[int, ...]:
    if layer.padding_mode != "zeros":
        raise UserError(f"{layer}: padding_mode={layer.padding_mode!r} cannot be exported; only 'zeros'")
    if layer.padding == "valid":
        return (0,) * (2 * len(layer.kernel_size))
    if layer.padding == "same":  # PyTorch puts the odd pixel at the end
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        return tuple(t // 2 for t in total) + tuple(t - t // 2 for t in total)
    return tuple(layer.padding) * 2


def deployed_layer(name: str, layer: QuantLayer, schemes: LayerSchemes) -> DeployedLayer:
    wscheme, ascheme = schemes
    weight = layer.weight.detach().float().cpu()
    codes = None if wscheme is None else quantize_codes(weight, wscheme)
    bias = layer.effective_bias()
    bias = None if bias is None else bias.detach().float().cpu().numpy()
    common = dict(
        name=name,
        weight=weight.numpy() if wscheme is None else dequantize_codes(codes, wscheme),
        float_weight=weight.numpy(),
        codes=codes, wscheme=wscheme, ascheme=ascheme, bias=bias,
    )
    if isinstance(layer, QuantEmbedding):
        return DeployedLayer(kind="embedding", **common)
    if isinstance(layer, (QuantConv1d, QuantConv2d)):
        return DeployedLayer(
            kind="conv", stride=tuple(layer.stride), pads=_conv_pads(layer),
            dilation=tuple(layer.dilation), groups=layer.groups, **common,
        )
    return DeployedLayer(kind="linear", **common)


def deployed_layers(qmodel: QuantModel) -> list[DeployedLayer]:
    """Every quantized layer of ``qmodel`` in execution order, at its argmax assignment."""
    assignment = Assignment.of(qmodel)
    return [deployed_layer(name, layer, assignment[name]) for name, layer in qmodel.layers()]
