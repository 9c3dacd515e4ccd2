"""Batch norms kept through training, folded into the deployment graph's quantized layers.

With ``search.fold_bn=false`` a BN follows quantized convolutions while training.  In the ONNX
graph each such BN is folded into the layer it follows: the integer weight codes stay as
trained, each output channel's weight scale is multiplied by g = gamma / sqrt(var + eps) (so
it is no longer a power of two) and the bias becomes beta + (b - mean) * g.  onnxruntime then
runs the layer as one (integer) convolution; left in the graph, the BN would be fused by
onnxruntime into a float weight that it re-quantizes per tensor, a lossy change.  A channel
with a negative gamma gets a negative weight scale (DequantizeLinear and onnxruntime's
QLinearConv take it); a BN with a zero or non-finite g on some channel stays in the graph.
The scales are no longer powers of two, so the graph agrees with PyTorch up to float rounding
(CIFAR-10 ResNet-20 runs: 99.91-99.97 % top-1 agreement as a graph, 99.46-99.77 % with
onnxruntime's integer kernels, accuracy within 0.1 point).  The packed checkpoint keeps the BN as it is (its ``extra`` state).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
import torch.fx
from torch import nn

from hmqsearch.export.deployed import DeployedLayer
from hmqsearch.quant.fold import batchnorm_pairs
from hmqsearch.quant.layers import QuantConv1d, QuantConv2d, QuantLinear
from hmqsearch.quant.prepare import QuantModel

log = logging.getLogger(__name__)

_FOLDABLE = {QuantConv1d: nn.BatchNorm1d, QuantConv2d: nn.BatchNorm2d, QuantLinear: nn.BatchNorm1d}


class _QuantLayersAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, tuple(_FOLDABLE)) or super().is_leaf_module(m, module_qualified_name)


def _folded(d: DeployedLayer, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> DeployedLayer | None:
    with torch.no_grad():
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        g = (gamma / torch.sqrt(bn.running_var + bn.eps)).float().cpu()
        if not (torch.isfinite(g).all() and (g != 0).all()):
            return None
        bias = torch.zeros_like(g) if d.bias is None else torch.from_numpy(d.bias)
        new_bias = (beta.float().cpu() + (bias - bn.running_mean.float().cpu()) * g).numpy()
    scale = g.numpy().astype(np.float32)
    shape = (-1,) + (1,) * (d.weight.ndim - 1)
    return dataclasses.replace(
        d, weight=(d.weight * scale.reshape(shape)).astype(np.float32), bias=new_bias.astype(np.float32),
        channel_scale=scale,
    )


def fold_batchnorm_into(qmodel: QuantModel, layers: list[DeployedLayer]) -> tuple[list[DeployedLayer], list[str]]:
    """``layers`` with each following BN folded in, and the names of the BN modules folded."""
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in qmodel.net.modules()):
        return layers, []
    try:
        graph = _QuantLayersAsLeaves().trace(qmodel.net)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot fold safely"
        log.warning("batch norm kept in the deployment graph: torch.fx could not trace the model (%s)", exc)
        return layers, []
    modules = dict(qmodel.net.named_modules())
    bn_of = dict(batchnorm_pairs(qmodel.net, graph, _FOLDABLE))
    out, folded = [], []
    for d in layers:
        bn_name = bn_of.get(d.name)
        new = None if bn_name is None else _folded(d, modules[bn_name])
        if bn_name is not None and new is None:
            log.info("%s kept in the deployment graph: a channel's scale is zero or not finite", bn_name)
        out.append(d if new is None else new)
        if new is not None:
            folded.append(bn_name)
    return out, folded
