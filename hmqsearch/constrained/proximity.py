"""Per-layer proximity constraints: each quantized layer's output stays close to the float layer's.

For layer l, on the input x it receives in the training forward:

    d_l = mean((layer_q(x) - layer_float(x))^2)            (absolute), or
    d_l = that / mean(layer_float(x)^2)                      (relative to the float output energy)

where ``layer_float`` is the layer with the float weights it had when the constraints were
built (the trained float model's layer), held fixed: measured against the weights being
trained, a layer could satisfy its constraint by moving its float weights onto the
quantization grid, and its dual would then say nothing about the layer's sensitivity.

and the constraint d_l <= tolerance has the normalised violation v_l = d_l / tolerance - 1 and
its own non-negative dual, ascended like the budget duals (after every step, or once per epoch
on the epoch's mean violation).  The float output is the target (no gradient through it).  A
layer whose dual ends large is one whose quantization the task loss could not absorb: the
duals rank the layers by sensitivity (Hounie et al., arXiv 2210.15623).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmqsearch.settings import POSITIVE, OneOf, Real, check_fields, setting
from hmqsearch.constrained.dual import DualVariables
from hmqsearch.quant.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from hmqsearch.quant.prepare import QuantModel

UPDATES = ("step", "epoch")


@dataclass
class ProximitySpec:
    """``search.proximity`` in the configuration."""

    enabled: bool = False  # on: one dual per layer, sensitivity.md/.png in the run dir
    tolerance: Real = setting(0.01, POSITIVE)
    relative: bool = True  # divide by the float output's mean square
    update: str = setting("step", OneOf(UPDATES))  # when the proximity duals are ascended
    dual_lr: Real = setting(0.1, POSITIVE)

    def validate(self) -> None:
        check_fields(self, "search.proximity")


def float_output(layer: QuantConv2d | QuantLinear, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's output on ``x`` with float ``weight`` / ``bias`` and no input quantization."""
    if isinstance(layer, (QuantConv1d, QuantConv2d)):
        return layer._conv_forward(x, weight, bias)
    if isinstance(layer, QuantEmbedding):
        return F.embedding(x, weight, layer.padding_idx)
    return F.linear(x, weight, bias)


class ProximityConstraints(nn.Module):
    """One proximity constraint and dual per quantized layer, measured by forward hooks.

    The hooks measure only while the module is in training mode.  ``lagrangian_term()``
    gives sum_l lambda_l v_l of the last forward; ``step_end()`` ascends the duals (per step)
    or accumulates the violations (per epoch, ascended by ``epoch_end()``).
    """

    def __init__(self, qmodel: QuantModel, spec: ProximitySpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        self.layer_names = list(qmodel.layer_names)
        self.duals = DualVariables(self.layer_names, spec.dual_lr)
        self._current: dict[str, list[Tensor]] = {}
        self._epoch_sum = torch.zeros(len(self.layer_names))
        self._epoch_steps = 0
        self._reference = {
            name: (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone())
            for name, layer in qmodel.layers()
        }
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in qmodel.layers()]

    def _hook(self, name: str):  # noqa: ANN202 - a forward hook
        def hook(layer: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if self.training:
                self._current.setdefault(name, []).append(self.distance(name, layer, args[0], out))

        return hook

    def distance(self, name: str, layer: QuantConv2d | QuantLinear, x: Tensor, out: Tensor) -> Tensor:
        """d_l: mean squared difference to the float layer's output (relative: over its mean square)."""
        weight, bias = self._reference[name]
        target = float_output(layer, x, weight.to(x.device), None if bias is None else bias.to(x.device)).detach()
        d = (out - target).pow(2).mean()
        return d / target.pow(2).mean().clamp(min=1e-12) if self.spec.relative else d

    def violations(self) -> Tensor:
        """v_l = d_l / tolerance - 1 of the last forward (layers not called there: -1, satisfied)."""
        device = self.duals.values.device
        v = [
            torch.stack(self._current[n]).mean() / self.spec.tolerance - 1.0 if n in self._current
            else torch.tensor(-1.0, device=device)
            for n in self.layer_names
        ]
        return torch.stack([t.to(device) for t in v])

    def lagrangian_term(self) -> Tensor:
        return self.duals.lagrangian_term(self.violations())

    def step_end(self, reduce: Callable[[Tensor], Tensor] = lambda v: v) -> None:
        """After the backward pass: ascend (``update=step``) or accumulate (``update=epoch``).

        ``reduce`` averages the violations over DDP ranks so that every rank takes the same step.
        """
        if not self._current:
            return
        v = reduce(self.violations().detach())
        self._current = {}
        if self.spec.update == "step":
            self.duals.ascend(v)
        else:
            self._epoch_sum = self._epoch_sum.to(v.device) + v
            self._epoch_steps += 1

    def epoch_end(self) -> None:
        if self.spec.update == "epoch" and self._epoch_steps:
            self.duals.ascend(self._epoch_sum / self._epoch_steps)
        self._epoch_sum = torch.zeros_like(self._epoch_sum)
        self._epoch_steps = 0

    def ranking(self) -> list[tuple[str, float]]:
        """Layers by final dual, largest (most sensitive) first."""
        return sorted(self.duals.as_dict().items(), key=lambda kv: -kv[1])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
