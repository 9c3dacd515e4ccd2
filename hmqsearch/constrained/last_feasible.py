"""The search's last argmax that met every budget, kept so the search can end on it.

With the duals enforcing the argmax's own cost and restarting at 0 once it fits
(``search.enforce=argmax_only``, ``search.dual_restart``), the argmax oscillates around the
budget: over it until the duals have risen enough, then under it once they restart. Where the
search stops in that cycle is chance: at 12x on CIFAR ResNet-20 it stopped 12 % over the budget
and repair then lowered 4 layers by their logit margins alone. Keeping the logits of the last
feasible step of the final phase (the bounds at the budgets) ends the search on an assignment
the search itself chose within budget; fill then spends what is left.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LastFeasible(nn.Module):
    """Copies of the logits from the last step at which every constraint's argmax cost held.

    Buffers, so they live in every checkpoint; updated with ``torch.where`` on the device,
    so recording never waits for the GPU.
    """

    def __init__(self, logits: list[nn.Parameter]) -> None:
        super().__init__()
        self._logits = list(logits)
        for i, p in enumerate(self._logits):
            self.register_buffer(f"logits_{i}", p.detach().clone())
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def _copies(self) -> list[Tensor]:
        return [getattr(self, f"logits_{i}") for i in range(len(self._logits))]

    @torch.no_grad()
    def record(self, feasible: Tensor) -> None:
        """Keep the current logits where ``feasible`` (a bool tensor) is true."""
        feasible = feasible.to(self.seen.device)
        for copy, p in zip(self._copies(), self._logits):
            copy.copy_(torch.where(feasible, p.detach(), copy))
        self.seen.logical_or_(feasible)

    @torch.no_grad()
    def restore(self) -> bool:
        """Put the kept logits back; False (nothing changed) when no step was feasible."""
        if not bool(self.seen):
            return False
        for copy, p in zip(self._copies(), self._logits):
            p.copy_(copy)
        return True
