"""Which layer of a model refuses the data's input, in shapes rather than in PyTorch's words."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_EXPECTS = {  # module type -> (attribute, what it counts, the input dimension it is compared with)
    nn.Conv1d: ("in_channels", "input channels", 1),
    nn.Conv2d: ("in_channels", "input channels", 1),
    nn.Conv3d: ("in_channels", "input channels", 1),
    nn.Linear: ("in_features", "input features", -1),
    nn.BatchNorm1d: ("num_features", "channels", 1),
    nn.BatchNorm2d: ("num_features", "channels", 1),
}


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def describe_misfit(net: nn.Module, example: Tensor) -> str:
    """Run ``example`` through ``net`` (which fails on it) and say where: the leaf layer that
    raised, what it expects and the shape it got; or, when the failure is outside any layer,
    the last layer that ran and its output shape."""
    entered: list[tuple[str, nn.Module, tuple[int, ...] | None]] = []
    finished: list[tuple[str, tuple[int, ...] | None]] = []

    def before(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            entered.append((name, module, _shape(args[0]) if args else None))
        return hook

    def after(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            entered.pop()
            finished.append((name, _shape(output)))
        return hook

    leaves = [(n, m) for n, m in net.named_modules() if n and not any(True for _ in m.children())]
    handles = [h for n, m in leaves for h in (m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n)))]
    try:
        with torch.no_grad():
            net.eval()(example)
        return f"inputs of shape {tuple(example.shape)} pass through it"  # not expected: the caller saw it fail
    except RuntimeError:
        pass
    finally:
        for h in handles:
            h.remove()
    if entered:
        name, module, got = entered[-1]
        expects = _EXPECTS.get(type(module))
        if expects is not None:
            attr, what, dim = expects
            return (f"its layer {name} ({type(module).__name__}) expects {getattr(module, attr)} {what} "
                    f"but gets an input of shape {got} (batch first)")
        return f"its layer {name} ({type(module).__name__}) cannot take an input of shape {got} (batch first)"
    if finished:
        name, shape = finished[-1]
        return f"its forward pass fails after layer {name}, whose output has shape {shape} (batch first)"
    return f"its forward pass fails before its first layer on inputs of shape {tuple(example.shape)} (batch first)"
