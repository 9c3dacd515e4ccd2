"""Conv1d, Conv2d and Linear layers that carry an HMQ weight quantizer and an HMQ input quantizer,
and Embedding layers that carry a weight quantizer (their input is integer indices)."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from hmqsearch.quant.functional import round_ste
from hmqsearch.quant.hmq import HMQQuantizer


@dataclass
class LayerShape:
    """Per-sample work of one layer in one model forward (summed over calls when reused)."""

    macs: int = 0
    in_elements: int = 0
    out_elements: int = 0
    calls: int = 0
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)


class QuantLayerMixin:
    """Shared behaviour of quantized layers: the two quantizers and the shape record."""

    wq: HMQQuantizer
    aq: HMQQuantizer  # pinned to float where the input is not quantized (embeddings)
    weight: nn.Parameter
    shape: LayerShape
    quantizes_input = True  # False: the input holds indices, not values (embeddings)

    def _init_quantizers(self, weight_q: HMQQuantizer, act_q: HMQQuantizer) -> None:
        self.wq = weight_q
        self.aq = act_q
        self.shape = LayerShape()
        self.recording = False

    @property
    def weight_numel(self) -> int:
        return self.weight.numel()

    @property
    def out_channels_count(self) -> int:
        return self.weight.shape[0]

    def weights_read(self) -> int:
        """Weights one sample's forward reads (the latency model's memory traffic)."""
        return self.weight.numel()

    def quantized_weight(self) -> Tensor:
        return self.wq(self.weight)

    def effective_bias(self) -> Tensor | None:
        """The bias as an integer kernel adds it: on the accumulator grid s_x * s_w.

        Integer kernels (onnxruntime's QLinearConv, TensorRT) add an int32 bias
        round(b / (s_x * s_w)) to the int32 accumulator; rounding it here too (straight-through
        gradient) makes the fake-quantized layer equal the deployed one bit for bit.  Only when
        both input and weights use a discrete scheme; the search relaxation keeps the float bias.
        """
        if self.bias is None or not (self.wq.is_discrete() and self.aq.is_discrete()):
            return self.bias
        grid = self.aq.discrete_steps().reshape(()) * self.wq.discrete_steps()
        return round_ste(self.bias / grid) * grid

    def _record(self, x: Tensor, out: Tensor) -> None:
        n = x.shape[0]
        self.shape.calls += 1
        self.shape.in_elements += x[0].numel()
        self.shape.out_elements += out[0].numel()
        self.shape.macs += self._macs_per_output() * (out.numel() // max(n, 1))
        self.shape.input_shapes.append(tuple(x.shape[1:]))


class _QuantConv(QuantLayerMixin):
    """A convolution (any dimensionality) whose weight and input go through HMQ quantizers."""

    @classmethod
    def from_float(cls, conv: nn.Conv1d | nn.Conv2d, weight_q: HMQQuantizer, act_q: HMQQuantizer) -> "_QuantConv":
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_quantizers(weight_q, act_q)
        return layer

    def _macs_per_output(self) -> int:
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(self.aq(x), self.quantized_weight(), self.effective_bias())
        if self.recording:
            self._record(x, out)
        return out


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input go through HMQ quantizers (grouped/depthwise too)."""


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` whose weight and input go through HMQ quantizers (grouped/depthwise too)."""


class QuantEmbedding(QuantLayerMixin, nn.Embedding):
    """``nn.Embedding`` whose table goes through an HMQ weight quantizer (one scale per row).

    Its input holds indices: ``aq`` is pinned to float and never applied.  Deployed as a
    Gather from the dequantized integer table.
    """

    quantizes_input = False
    bias = None

    @classmethod
    def from_float(cls, emb: nn.Embedding, weight_q: HMQQuantizer, act_q: HMQQuantizer) -> "QuantEmbedding":
        layer = cls(
            emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.max_norm, emb.norm_type,
            emb.scale_grad_by_freq, emb.sparse, device=emb.weight.device, dtype=emb.weight.dtype,
        )
        layer.weight = emb.weight
        layer._init_quantizers(weight_q, act_q)
        return layer

    def weights_read(self) -> int:
        return self.shape.out_elements  # the rows gathered, not the whole table

    def _macs_per_output(self) -> int:
        return 0

    def forward(self, x: Tensor) -> Tensor:
        out = F.embedding(
            x, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        if self.recording:
            self._record(x, out)
        return out


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose weight and input go through HMQ quantizers."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_q: HMQQuantizer, act_q: HMQQuantizer) -> "QuantLinear":
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_quantizers(weight_q, act_q)
        return layer

    def _macs_per_output(self) -> int:
        return self.in_features

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(self.aq(x), self.quantized_weight(), self.effective_bias())
        if self.recording:
            self._record(x, out)
        return out
