"""SPIQ: data-free static per-channel input quantization, folded into the weights.

Yvinec, Dapogny, Cord, Bailly, arXiv 2203.14642.  For a layer whose input channel c lies in a
data-free range of size a_c (:mod:`hmqsearch.quant.bn_ranges`), with A = max_c a_c:

* the input channel is divided by s_c = a_c / A (``InputChannelScale``), so every channel of
  ``x / s`` spans the same range A and one per-tensor power-of-two step quantizes them all;
* the weights take the scale instead, along the input-channel axis: W'[:, c] = W[:, c] * s_c,
  so ``conv(x / s, W') == conv(x, W)`` exactly in real arithmetic;
* W' is then quantized per output channel as usual.

Inference is one integer matmul of the input codes with W' codes plus a per-output-channel
rescale; the division by s_c is a per-channel constant that a deployment merges into the
previous layer's per-output-channel requantization (in the ONNX graph it stays a ``Mul`` by a
per-channel constant in front of the input's QuantizeLinear).  ``power_of_two=True`` rounds
each s_c up to a power of two, so that the division is exact and every scale of the deployed
graph is a power of two; the default keeps the paper's exact ratios.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
from torch import Tensor, nn

from hmqsearch.errors import UserError
from hmqsearch.kernels.torch_impl import channel_view
from hmqsearch.quant.bn_ranges import ChannelRange
from hmqsearch.quant.layers import QuantConv2d, QuantLinear
from hmqsearch.quant.prepare import QuantModel

MIN_SCALE = 2.0**-16  # floor of s_c, for channels whose range is (numerically) zero
SCALES_ATTR = "spiq_input_scales"


class InputChannelScale(nn.Module):
    """Multiplies channel c (dim 1) of its input by ``1 / s_c``."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_scale", 1.0 / scale.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return x * channel_view(self.inv_scale.to(x.dtype), x.dim(), 1)


def channel_scales(r: ChannelRange, power_of_two: bool = False) -> Tensor:
    """s_c = a_c / max(a) with a_c the channel's max |x|, floored at MIN_SCALE."""
    a = r.absmax
    s = (a / a.max().clamp(min=torch.finfo(torch.float32).tiny)).clamp(min=MIN_SCALE, max=1.0)
    return torch.exp2(torch.ceil(torch.log2(s))) if power_of_two else s


def fold_input_scales(layer: nn.Conv2d | nn.Linear, scale: Tensor) -> None:
    """W'[o, c] = W[o, c] * s_c along the input-channel axis (grouped and depthwise too)."""
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.Linear):
            w.mul_(scale.to(w)[None, :])
            return
        out, per_group = w.shape[0], w.shape[1]
        group_of_out = torch.arange(out) // (out // layer.groups)
        idx = group_of_out[:, None] * per_group + torch.arange(per_group)[None, :]
        w.mul_(scale.to(w)[idx].reshape(out, per_group, *([1] * (w.dim() - 2))))


class _LeafTracer(torch.fx.Tracer):
    """Traces a prepared network with its quantized layers kept as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantConv2d, QuantLinear, InputChannelScale)) or super().is_leaf_module(m, qualname)


def _insert_scale_modules(qmodel: QuantModel, scales: dict[str, Tensor]) -> None:
    """Put an ``InputChannelScale`` in front of every call of each layer in ``scales``.

    The network is re-traced into a ``torch.fx.GraphModule`` that keeps every module under
    its name; the scale modules live under ``spiq_input_scales.<layer name with _>``.
    """
    net = qmodel.net
    try:
        graph = _LeafTracer().trace(net)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot insert the scales"
        raise UserError(f"SPIQ needs a torch.fx-traceable network: {str(exc).splitlines()[0]}") from exc
    holder = nn.Module()
    for name, s in scales.items():
        holder.add_module(name.replace(".", "_"), InputChannelScale(s))
    net.add_module(SCALES_ATTR, holder)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in scales:
            with graph.inserting_before(node):
                scaled = graph.call_module(f"{SCALES_ATTR}.{node.target.replace('.', '_')}", (node.args[0],))
            node.args = (scaled, *node.args[1:])
    graph.lint()
    qmodel.net = torch.fx.GraphModule(net, graph, class_name=type(net).__name__)


def apply_spiq(qmodel: QuantModel, ranges: dict[str, ChannelRange], power_of_two: bool = False) -> dict[str, Tensor]:
    """Fold SPIQ's per-channel input scales into every quantized layer of ``qmodel``, in place.

    ``ranges``: the per-channel input ranges by layer name (:func:`bn_ranges.input_ranges`
    on the float model).  Each layer's weight threshold grid is re-centred on the folded
    weights (per output channel) and its input grid on the common range A of ``x / s``
    (unsigned when no channel can be negative).  Returns the scales s by layer name.
    """
    missing = [name for name in qmodel.layer_names if name not in ranges]
    if missing:
        raise UserError(f"SPIQ: no data-free input range for layer(s) {', '.join(missing)}")
    scales: dict[str, Tensor] = {}
    for name, layer in qmodel.layers():
        r = ranges[name]
        if r.absmax.numel() != layer.weight.shape[1] * getattr(layer, "groups", 1):
            raise UserError(f"SPIQ: range of {name} has {r.absmax.numel()} channels, the layer expects another count")
        s = channel_scales(r, power_of_two)
        fold_input_scales(layer, s)
        w = layer.weight.detach()
        per_channel = layer.wq.per_channel_axis is not None
        layer.wq.set_range(w.abs().reshape(w.shape[0], -1).amax(1) if per_channel else w.abs().max())
        layer.wq.init_from_data(w)
        layer.aq.signed = r.signed
        layer.aq.set_range(float((r.absmax / s).max()))
        scales[name] = s
    _insert_scale_modules(qmodel, scales)
    return scales


def restore_input_scales(qmodel: QuantModel, state: Mapping[str, Tensor]) -> int:
    """Put SPIQ's input-scale modules back into a freshly prepared ``qmodel`` from ``state``, the
    state dict of a SPIQ model (its network's or the QuantModel's, keys
    ``[net.]spiq_input_scales.<layer>.inv_scale``), so that ``state`` loads into it; returns
    how many layers got a scale (0: ``state`` is not a SPIQ model's, ``qmodel`` unchanged).
    The folded weights and the scales' values come with the state dict."""
    marker, suffix = f"{SCALES_ATTR}.", ".inv_scale"
    held = {k.split(marker, 1)[1].removesuffix(suffix): v for k, v in state.items() if marker in k and k.endswith(suffix)}
    scales = {name: 1.0 / held[name.replace(".", "_")] for name in qmodel.layer_names if name.replace(".", "_") in held}
    if scales:
        _insert_scale_modules(qmodel, scales)
    return len(scales)


def static_per_tensor_ranges(qmodel: QuantModel, ranges: dict[str, ChannelRange]) -> dict[str, float]:
    """The data-free per-tensor baseline: each input grid centred on max_c a_c (no folding)."""
    out = {}
    for name, layer in qmodel.layers():
        r = ranges[name]
        layer.aq.signed = r.signed
        out[name] = float(r.absmax.max())
        layer.aq.set_range(out[name])
    return out
