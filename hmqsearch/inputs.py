"""Model inputs of any structure: one tensor, a tuple of tensors, or a dict of named tensors.

A data loader yields ``(inputs, labels)``; ``inputs`` is what the model takes:

* a tensor (images, token ids): ``model(x)``;
* a tuple or list of tensors: ``model(*x)`` (e.g. token ids and an attention mask);
* a dict of tensors: ``model(**x)`` (e.g. ``input_ids``, ``attention_mask`` of a tokenizer).

Every tensor keeps its dtype (int64 token ids stay int64) and has the batch on axis 0.  A
model's output is its logits: a tensor, an object with ``.logits`` (a ``transformers``
ModelOutput) or a tuple whose first element is the logits (``return_dict=False``).
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from hmqsearch.errors import UserError

Inputs = Union[Tensor, tuple, list, dict]

SINGLE_NAME = "input"  # the ONNX input name of a model that takes one tensor


def _check(x: Any) -> None:
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else [x]
    bad = [type(v).__name__ for v in values if not isinstance(v, Tensor)]
    if bad or (isinstance(x, (tuple, list, dict)) and len(x) == 0):
        raise UserError(
            f"model inputs of type {type(x).__name__} holding {bad or 'nothing'}; allowed: a tensor, "
            "a non-empty tuple/list of tensors or a non-empty dict of tensors (batch on axis 0)"
        )


def named_tensors(x: Inputs) -> list[tuple[str, Tensor]]:
    """The input tensors with their ONNX input names: ``input``; ``input_0``, ``input_1``, ...;
    or the dict's keys."""
    _check(x)
    if isinstance(x, dict):
        return [(str(k), v) for k, v in x.items()]
    if isinstance(x, (tuple, list)):
        return [(f"{SINGLE_NAME}_{i}", v) for i, v in enumerate(x)]
    return [(SINGLE_NAME, x)]


def structure(x: Inputs) -> dict[str, Any]:
    """A JSON description of the structure: ``{"kind": "tensor" | "tuple" | "dict", "names": [...]}``."""
    kind = "dict" if isinstance(x, dict) else "tuple" if isinstance(x, (tuple, list)) else "tensor"
    return {"kind": kind, "names": [name for name, _ in named_tensors(x)]}


def rebuild(desc: dict[str, Any], tensors: list[Tensor]) -> Inputs:
    """The inputs of structure ``desc`` (see :func:`structure`) from its tensors in order."""
    if desc["kind"] == "dict":
        return dict(zip(desc["names"], tensors))
    if desc["kind"] == "tuple":
        return tuple(tensors)
    return tensors[0]


def apply(x: Inputs, fn: Any) -> Inputs:
    """``fn`` applied to every tensor, the structure kept."""
    _check(x)
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(fn(v) for v in x)
    return fn(x)


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    return apply(x, lambda t: t.to(device))


def take(x: Inputs, n: int) -> Inputs:
    """The first ``n`` samples."""
    return apply(x, lambda t: t[:n])


def batch_size(x: Inputs) -> int:
    return int(named_tensors(x)[0][1].shape[0])


def device_of(x: Inputs) -> torch.device:
    return named_tensors(x)[0][1].device


def numpy_feed(x: Inputs) -> dict[str, np.ndarray]:
    """The inputs as an onnxruntime feed, dtypes kept."""
    return {name: t.detach().cpu().numpy() for name, t in named_tensors(x)}


def logits_of(out: Any) -> Tensor:
    """The logits in a model's output (see the module docstring)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise UserError(
        f"the model returned {type(out).__name__}; allowed: a tensor of logits, an object with a .logits "
        "tensor (transformers' ModelOutput) or a tuple whose first element is the logits"
    )


def run_model(model: nn.Module, x: Inputs) -> Tensor:
    """``model`` called on ``x`` as its structure says (``model(x)``, ``model(*x)``, ``model(**x)``), its logits."""
    _check(x)
    if isinstance(x, dict):
        return logits_of(model(**x))
    if isinstance(x, (tuple, list)):
        return logits_of(model(*x))
    return logits_of(model(x))
