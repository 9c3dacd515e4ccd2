"""Dual ascent for the Lagrangian L = loss + sum_j lambda_j * v_j (one dual per constraint)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DualVariables(nn.Module):
    """Non-negative multipliers, updated lambda_j <- max(0, lambda_j + eta * v_j).

    Kept as a buffer so they live in every checkpoint and are restored on resume.  The final
    value of a dual is the sensitivity of the objective to its constraint.

    With ``restart`` a dual drops to 0 as soon as its constraint holds (a "dual restart",
    Gallego-Posada et al. 2022).  Plain ascent winds up while the logits, which Adam moves at
    a bounded rate whatever the dual, take tens of steps to cross to a lower width; the wound-up
    dual then keeps pushing long after the constraint holds, and the search ends far under its
    budget (CIFAR ResNet-20 at 16x: the argmax at 0.56-0.70 of the bound while the dual unwound).
    """

    def __init__(self, names: list[str], lr: float, init: float = 0.0, restart: bool = False) -> None:
        super().__init__()
        self.names = list(names)
        self.lr = lr
        self.restart = restart
        self.register_buffer("values", torch.full((len(self.names),), float(init)))

    def lagrangian_term(self, violations: Tensor) -> Tensor:
        """sum_j lambda_j * v_j with the duals held constant (primal descent)."""
        if not self.names:
            return violations.new_zeros(())
        return (self.values.to(violations.device) * violations).sum()

    @torch.no_grad()
    def ascend(self, violations: Tensor) -> None:
        if self.names:
            v = violations.detach().to(self.values.device)
            self.values.add_(self.lr * v).clamp_(min=0.0)
            if self.restart:
                self.values.mul_((v > 0).to(self.values.dtype))

    def as_dict(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.values.tolist())}
