"""Dual ascent for the Lagrangian L = loss + sum_j lambda_j * v_j (one dual per constraint)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DualVariables(nn.Module):
    """Non-negative multipliers, updated lambda_j <- max(0, lambda_j + eta * v_j).

    Kept as a buffer so they live in every checkpoint and are restored on resume.  The final
    value of a dual is the sensitivity of the objective to its constraint.
    """

    def __init__(self, names: list[str], lr: float, init: float = 0.0) -> None:
        super().__init__()
        self.names = list(names)
        self.lr = lr
        self.register_buffer("values", torch.full((len(self.names),), float(init)))

    def lagrangian_term(self, violations: Tensor) -> Tensor:
        """sum_j lambda_j * v_j with the duals held constant (primal descent)."""
        if not self.names:
            return violations.new_zeros(())
        return (self.values.to(violations.device) * violations).sum()

    @torch.no_grad()
    def ascend(self, violations: Tensor) -> None:
        if self.names:
            self.values.add_(self.lr * violations.detach().to(self.values.device)).clamp_(min=0.0)

    def as_dict(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.values.tolist())}
