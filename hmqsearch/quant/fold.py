"""Batch-norm folding into the preceding convolution or linear layer, found by tracing."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.fx
from torch import nn

log = logging.getLogger(__name__)

_FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}


def _fold_into(layer: nn.Conv1d | nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
    """w' = w * g / sqrt(v + eps) per output channel; b' = beta + (b - mean) * g / sqrt(v + eps)."""
    with torch.no_grad():
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_var)
        scale = gamma / torch.sqrt(bn.running_var + bn.eps)
        layer.weight.mul_(scale.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = beta + (bias - bn.running_mean) * scale
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def _replace_module(model: nn.Module, target: nn.Module, new: nn.Module) -> None:
    """Replace every attribute that refers to ``target`` (a module can sit under several names)."""
    for parent in model.modules():
        for attr, child in list(parent.named_children()):
            if child is target:
                setattr(parent, attr, new)


def batchnorm_pairs(
    model: nn.Module, graph: torch.fx.Graph, foldable: dict[type, type]
) -> list[tuple[str, str]]:
    """(layer, batch norm) names where the BN only ever follows that layer and the layer's every
    call feeds that BN alone; ``foldable`` maps a layer type to the BN type that may follow it."""
    modules = dict(model.named_modules())
    followers: dict[str, set[str | None]] = defaultdict(set)  # layer -> what consumes each call
    leaders: dict[str, set[str | None]] = defaultdict(set)  # bn -> what produces each input
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if type(mod) in foldable:
            users = list(node.users)
            only = users[0] if len(users) == 1 else None
            is_bn = only is not None and only.op == "call_module" and isinstance(
                modules[only.target], foldable[type(mod)]
            )
            followers[node.target].add(only.target if is_bn else None)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            src = node.args[0] if node.args else None
            is_layer = isinstance(src, torch.fx.Node) and src.op == "call_module"
            leaders[node.target].add(src.target if is_layer and len(src.users) == 1 else None)
    pairs = []
    for layer_name, bns in followers.items():
        if len(bns) != 1 or None in bns:
            continue
        bn_name = next(iter(bns))
        if leaders[bn_name] == {layer_name}:
            pairs.append((layer_name, bn_name))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BN that only ever follows one conv/linear (and vice versa) into it, in place.

    Returns the (layer, batch norm) name pairs that were folded.  A model that
    ``torch.fx`` cannot trace keeps its batch norms (a warning says so); a model without
    batch norm is not traced at all.
    """
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
        return []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot fold safely"
        log.warning("batch norm left unfolded: torch.fx could not trace the model (%s)", exc)
        return []
    modules = dict(model.named_modules())
    pairs = batchnorm_pairs(model, graph, _FOLDABLE)
    for layer_name, bn_name in pairs:
        _fold_into(modules[layer_name], modules[bn_name])
        _replace_module(model, modules[bn_name], nn.Identity())
    return pairs
