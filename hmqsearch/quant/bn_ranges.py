"""Data-free per-channel input ranges of every Conv2d / Linear, from the batch norms' statistics.

SPIQ (Yvinec et al., arXiv 2203.14642) reads the range of each channel from the batch norm
that produces it: the output of ``BN`` has mean ``beta_c`` and standard deviation
``|gamma_c|`` on the training data, so (Gaussian model) channel c lies in
``beta_c -+ k |gamma_c|`` and, after a ReLU, in ``[max(0, beta_c - k|gamma_c|),
max(0, beta_c + k|gamma_c|)]``.  This module propagates that description through the float
network (traced with ``torch.fx``, batch norms still unfolded) to the input of every layer:

* each channel carries (mean, var, lo, hi): Gaussian moments and a range;
* network input: pixels in [0, 1] normalised by ``(p - mean) / std``: the exact bounds
  ``[-mean / std, (1 - mean) / std]`` (moments of a uniform pixel);
* batch norm: ``(beta, gamma^2, beta - k|gamma|, beta + k|gamma|)``;
* ReLU / ReLU6: moments of the rectified Gaussian, the bounds clipped (quantiles pass
  through monotone functions);
* residual add: moments add (branches taken as independent), bounds
  ``mean -+ k sqrt(var)`` but never wider than the sum of the two ranges;
* a Conv2d / Linear output with no batch norm after it: moments through the weights
  (``W mean + b``, ``W^2 var``), bounds ``mean -+ k sqrt(var)``;
* pooling, flatten, identity, dropout, channel-preserving slicing: unchanged (a stated
  over-estimate for average pooling); channel zero-padding: zero channels.

Any other operation raises :class:`UserError`, naming it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from hmqsearch.errors import UserError

DEFAULT_K = 6.0  # chosen from {3, 4, 6, 8}; see docs/spiq_sensitivity.md


@dataclass
class ChannelRange:
    """Per-channel Gaussian moments and range [lo, hi] of one tensor (vectors of length C)."""

    mean: Tensor
    var: Tensor
    lo: Tensor
    hi: Tensor

    @property
    def absmax(self) -> Tensor:
        """Per-channel max |x| within the range."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def signed(self) -> bool:
        return bool((self.lo < 0).any())


def _gaussian(mean: Tensor, var: Tensor, k: float) -> ChannelRange:
    sd = var.clamp(min=0).sqrt()
    return ChannelRange(mean, var, mean - k * sd, mean + k * sd)


def _rectified(r: ChannelRange, upper: float = math.inf) -> ChannelRange:
    """max(0, x) (clipped at ``upper`` for ReLU6) of a Gaussian channel: exact moments of the
    rectified Gaussian (the upper clip is not in the moments), bounds clipped."""
    sd = r.var.clamp(min=0).sqrt()
    normal = torch.distributions.Normal(0.0, 1.0)
    z = r.mean / sd.clamp(min=1e-12)
    cdf, pdf = normal.cdf(z), normal.log_prob(z).exp()
    m1 = r.mean * cdf + sd * pdf
    m2 = (r.mean**2 + r.var) * cdf + r.mean * sd * pdf
    degenerate = sd < 1e-12
    mean = torch.where(degenerate, r.mean.clamp(min=0), m1)
    var = torch.where(degenerate, torch.zeros_like(m2), (m2 - m1**2).clamp(min=0))
    return ChannelRange(mean, var, r.lo.clamp(0, upper), r.hi.clamp(0, upper))


def _add(a: ChannelRange, b: ChannelRange, k: float) -> ChannelRange:
    g = _gaussian(a.mean + b.mean, a.var + b.var, k)
    return ChannelRange(g.mean, g.var, torch.maximum(g.lo, a.lo + b.lo), torch.minimum(g.hi, a.hi + b.hi))


def _through_layer(layer: nn.Conv2d | nn.Linear, r: ChannelRange, k: float) -> ChannelRange:
    """Moments of a layer's output channels when no batch norm re-describes them."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups
        out, per_group = w.shape[0], w.shape[1]
        idx = torch.arange(out)[:, None] // (out // groups) * per_group + torch.arange(per_group)[None, :]
        mean_in, var_in = r.mean[idx], r.var[idx]  # (out, in/groups)
        mean = (w.sum(dim=(2, 3)) * mean_in).sum(1)
        var = ((w**2).sum(dim=(2, 3)) * var_in).sum(1)
    else:
        mean, var = w @ r.mean, (w**2) @ r.var
    if layer.bias is not None:
        mean = mean + layer.bias.detach()
    return _gaussian(mean, var, k)


def _pad(r: ChannelRange, pad: Sequence[int], ndim: int = 4) -> ChannelRange:
    if len(pad) < 2 * (ndim - 1):  # spatial padding only: the channels are unchanged
        return r
    before, after = pad[2 * (ndim - 2)], pad[2 * (ndim - 2) + 1]
    z = lambda n: torch.zeros(n)  # noqa: E731
    return ChannelRange(*(torch.cat([z(before), v, z(after)]) for v in (r.mean, r.var, r.lo, r.hi)))


_RELU_FUNCS = {F.relu, torch.relu}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten)
_PASS_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.flatten, F.dropout}
_PASS_METHODS = {"flatten", "contiguous"}


def _is_channel_slice(index: Any) -> bool:
    """``x[:, :, ...]``-style indexing that keeps dimension 1 whole."""
    if not isinstance(index, tuple):
        return False
    return len(index) < 2 or index[1] == slice(None)


def input_ranges(
    model: nn.Module, input_mean: Sequence[float], input_std: Sequence[float], k: float = DEFAULT_K,
) -> dict[str, ChannelRange]:
    """Per-channel range of the input of every Conv2d / Linear of the float ``model``, by name.

    ``model`` must still hold its batch norms (call this before :func:`prepare` folds them);
    ``input_mean`` / ``input_std``: the normalisation applied to [0, 1] pixels.  A layer
    called more than once gets the union of its ranges.
    """
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    mean_in = torch.tensor(input_mean, dtype=torch.float32)
    std_in = torch.tensor(input_std, dtype=torch.float32)
    env: dict[torch.fx.Node, ChannelRange] = {}
    found: dict[str, ChannelRange] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = ChannelRange(
                (0.5 - mean_in) / std_in, (1 / 12) / std_in**2, -mean_in / std_in, (1 - mean_in) / std_in
            )
        elif node.op == "output":
            continue
        else:
            env[node] = _propagate(node, env, modules, found, k)
    return found


def _propagate(
    node: torch.fx.Node, env: dict, modules: dict[str, nn.Module], found: dict[str, ChannelRange], k: float
) -> ChannelRange:
    arg = env.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            gamma = mod.weight.detach() if mod.affine else torch.ones(mod.num_features)
            beta = mod.bias.detach() if mod.affine else torch.zeros(mod.num_features)
            return _gaussian(beta.clone(), gamma**2, k)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            prev = found.get(node.target)
            found[node.target] = arg if prev is None else ChannelRange(
                torch.maximum(prev.mean, arg.mean), torch.maximum(prev.var, arg.var),
                torch.minimum(prev.lo, arg.lo), torch.maximum(prev.hi, arg.hi),
            )
            return _through_layer(mod, arg, k)
        if isinstance(mod, nn.ReLU):
            return _rectified(arg)
        if isinstance(mod, nn.ReLU6):
            return _rectified(arg, 6.0)
        if isinstance(mod, _PASS_MODULES):
            return arg
        raise UserError(f"SPIQ ranges: no rule for module {node.target} ({type(mod).__name__})")
    if node.op == "call_function":
        fn = node.target
        if fn in _RELU_FUNCS:
            return _rectified(arg)
        if fn is F.relu6:
            return _rectified(arg, 6.0)
        if fn is F.hardtanh and node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0) == 0.0:
            return _rectified(arg, float(node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)))
        if fn in (operator.add, torch.add, operator.iadd):
            a, b = (env.get(x) for x in node.args[:2])
            if a is None or b is None:
                raise UserError(f"SPIQ ranges: {node.name} adds a constant; only tensor + tensor has a rule")
            return _add(a, b, k)
        if fn in _PASS_FUNCS:
            return arg
        if fn is operator.getitem and _is_channel_slice(node.args[1]):
            return arg
        if fn is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
            if value in (0, 0.0, None):
                return _pad(arg, pad)
    if node.op == "call_method":
        if node.target == "relu":
            return _rectified(arg)
        if node.target in _PASS_METHODS:
            return arg
    raise UserError(f"SPIQ ranges: no rule for {node.op} {node.target} (node {node.name})")
