"""LightningModule for the HMQ search: task loss plus the Lagrangian of the budgets."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from hmqsearch.constrained.constraints import Constraint
from hmqsearch.constrained.dual import DualVariables
from hmqsearch.constrained.proximity import ProximityConstraints
from hmqsearch.lit.classifier import ClassifierModule, OptimizerFactory
from hmqsearch.lit.distill import Distiller
from hmqsearch.quant.prepare import QuantModel


class SearchModule(ClassifierModule):
    """Primal descent on weights and logits, dual ascent on one multiplier per budget.

    The Gumbel-Softmax temperature is annealed exponentially from ``tau_start`` to ``tau_end``
    as a function of the global step, so a resumed run continues the schedule exactly.  The
    duals live in a buffer (``duals.values``) and the temperature in every quantizer's ``tau``
    buffer: both are part of each checkpoint.
    """

    def __init__(
        self,
        model: QuantModel,
        num_classes: int,
        optimizer: OptimizerFactory,
        lr: float,
        logit_lr: float,
        constraints: list[Constraint],
        dual_lr: float,
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        proximity: ProximityConstraints | None = None,
        distiller: Distiller | None = None,
    ) -> None:
        super().__init__(model, num_classes, optimizer, lr, distiller)
        self.constraints = constraints
        self.duals = DualVariables([c.name for c in constraints], dual_lr)
        self.logit_lr = logit_lr
        self.tau_start, self.tau_end = tau_start, tau_end
        self.tau = tau_start
        self._violations: Tensor | None = None
        self.proximity = proximity  # optional per-layer constraints, duals = layer sensitivity

    def temperature(self, step: int) -> float:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        progress = min(1.0, step / total)
        return self.tau_start * math.exp(progress * math.log(self.tau_end / self.tau_start))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.tau = self.temperature(self.global_step)
        self.model.set_tau(self.tau)

    def violations(self) -> Tensor:
        if not self.constraints:
            return torch.zeros(0, device=self.device)
        return torch.stack([c.violation() for c in self.constraints])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        task, logits, y = self.train_loss(batch)
        v = self.violations()
        self._violations = v.detach()
        loss = task + self.duals.lagrangian_term(v)
        if self.proximity is not None:
            loss = loss + self.proximity.lagrangian_term()
        self.log("train/loss", task, prog_bar=True)
        self.log("train/lagrangian", loss)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        self.log("search/tau", self.tau)
        for c, vi in zip(self.constraints, v.detach()):
            self.log(f"cost/{c.name}_expected", vi.add(1.0).mul(c.budget))
            self.log(f"cost/{c.name}_violation", vi)
        return loss

    def on_after_backward(self) -> None:
        """Dual ascent after the primal gradient, inside the step: a checkpoint taken at the end of
        the batch already holds the updated duals. Under DDP the violations are averaged over the
        ranks (they are equal anyway: computed from the synchronised logits), so every rank takes
        the same dual step."""
        mean_over_ranks = lambda v: self.trainer.strategy.reduce(v, reduce_op="mean")  # noqa: E731
        if self._violations is not None:
            self.duals.ascend(mean_over_ranks(self._violations))
            self._violations = None
        if self.proximity is not None:
            self.proximity.step_end(mean_over_ranks)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for name, value in zip(self.duals.names, self.duals.values):  # tensors: no GPU sync per step
            self.log(f"dual/{name}", value, prog_bar=True)
        if self.proximity is not None:
            self.log("dual/proximity_max", self.proximity.duals.values.max())

    def on_train_epoch_end(self) -> None:
        if self.proximity is not None:
            self.proximity.epoch_end()

    def on_validation_epoch_end(self) -> None:
        for c in self.constraints:
            exact = c.exact()
            self.log(f"cost/{c.name}_exact", exact)
            self.log(f"cost/{c.name}_budget", c.budget)
        self.log("val/feasible", float(all(c.satisfied() for c in self.constraints)))

    def param_groups(self) -> list[dict[str, Any]]:
        return [
            {"params": self.model.weight_parameters(), "lr": self.lr},
            {"params": self.model.logit_parameters(), "lr": self.logit_lr, "weight_decay": 0.0},
        ]
