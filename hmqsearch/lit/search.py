"""LightningModule for the HMQ search: task loss plus the Lagrangian of the budgets."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from hmqsearch.constrained.constraints import Constraint
from hmqsearch.constrained.dual import DualVariables
from hmqsearch.constrained.last_feasible import LastFeasible
from hmqsearch.constrained.proximity import ProximityConstraints
from hmqsearch.constrained.ramp import RampSpec
from hmqsearch.lit.classifier import ClassifierModule, OptimizerFactory
from hmqsearch.lit.distill import Distiller
from hmqsearch.lit.search_trace import SearchTrace
from hmqsearch.quant.prepare import QuantModel

log = logging.getLogger(__name__)


class SearchModule(ClassifierModule):
    """Primal descent on weights and logits, dual ascent on one multiplier per budget.

    The weights follow ``optimizer`` at ``lr`` (cosine); the HMQ logits have their own
    optimizer (``logit_optimizer`` at a constant ``logit_lr``, stepped beside the weights'),
    since they must move much faster than the weights for the argmax to leave its start.
    With a ``ramp`` each budget's bound moves from the start's exact cost to the budget in
    steps, and the Gumbel-Softmax temperature restarts with each step; everything is a function
    of the global step, so a resumed run continues the schedule exactly. The duals live in a
    buffer, the temperature in every quantizer's ``tau`` buffer, the logit optimizer's state and
    the search trace in the checkpoint's own entries.
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
        logit_optimizer: OptimizerFactory = torch.optim.Adam,
        ramp: RampSpec = RampSpec(steps=0),
        dual_restart: bool = False,
        end_feasible: bool = False,
    ) -> None:
        super().__init__(model, num_classes, optimizer, lr, distiller)
        self.constraints = constraints
        self.duals = DualVariables([c.name for c in constraints], dual_lr, restart=dual_restart)
        self.logit_lr = logit_lr
        self.logit_optimizer_factory = logit_optimizer
        self.logit_optimizer: torch.optim.Optimizer | None = None
        self._pending_logit_state: dict[str, Any] | None = None
        self.ramp = ramp
        self.start_costs = [c.exact() for c in constraints]  # the initial argmax: where the ramp starts
        self.tau_start, self.tau_end = tau_start, tau_end
        self.tau = tau_start
        self._violations: Tensor | None = None
        self.proximity = proximity  # optional per-layer constraints, duals = layer sensitivity
        self.trace = SearchTrace(model)
        # with end_feasible, the logits of the last step whose argmax met every budget in the
        # final phase; the search ends on them (restore_last_feasible)
        self.last_feasible = LastFeasible(model.logit_parameters()) if end_feasible else None

    def total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    def progress(self, step: int) -> float:
        return min(1.0, step / self.total_steps())

    def temperature(self, step: int) -> float:
        return self.ramp.temperature(self.tau_start, self.tau_end, self.progress(step))

    def bounds(self, step: int) -> list[float]:
        """Each constraint's bound at ``step`` (the budget itself without a ramp)."""
        progress = self.progress(step)
        return [self.ramp.bound(s, c.budget, progress) for s, c in zip(self.start_costs, self.constraints)]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.tau = self.temperature(self.global_step)
        self.model.set_tau(self.tau)
        for c, bound in zip(self.constraints, self.bounds(self.global_step)):
            c.bound = bound

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
            self.log(f"cost/{c.name}_expected", vi.add(1.0).mul(c.bound))
            self.log(f"cost/{c.name}_bound", c.bound)
            self.log(f"cost/{c.name}_violation", vi)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The logits' own step, beside the weights' (their gradients are never clipped)."""
        if self.logit_optimizer is not None:
            self.logit_optimizer.step()
            self.logit_optimizer.zero_grad(set_to_none=True)

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
        self.trace.maybe_record(self.global_step, self.total_steps(), self.tau, [c.bound for c in self.constraints])
        if self.last_feasible is not None and self.ramp.segment(self.progress(self.global_step)) == self.ramp.steps:
            self.last_feasible.record(self._argmax_feasible())

    def _argmax_feasible(self) -> Tensor:
        """Whether the argmax meets every budget, as a tensor on the device (no wait for the GPU)."""
        costs = [c.argmax() if c.argmax is not None else torch.tensor(c.exact()) for c in self.constraints]
        return torch.stack([cost.to(self.device) <= c.budget for cost, c in zip(costs, self.constraints)]).all()

    def restore_last_feasible(self) -> bool:
        """End the search on the last argmax of its final phase that met every budget (with
        ``end_feasible``); False where nothing was restored."""
        return self.last_feasible is not None and self.last_feasible.restore()

    def on_train_epoch_end(self) -> None:
        if self.proximity is not None:
            self.proximity.epoch_end()
        entry = self.trace.epoch_end(self.current_epoch)
        log.info("search epoch %d: %s", self.current_epoch, self.trace.describe(entry))
        for name, (bits, p) in entry["assignment"].items():
            self.log(f"argmax_bits/{name}", float(bits))
            self.log(f"p_argmax/{name}", p)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.logit_optimizer is not None:
            checkpoint["logit_optimizer"] = self.logit_optimizer.state_dict()
        checkpoint["search_trace"] = self.trace.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_logit_state = checkpoint.get("logit_optimizer")
        if "search_trace" in checkpoint:
            self.trace.load_state_dict(checkpoint["search_trace"])

    def on_validation_epoch_end(self) -> None:
        for c in self.constraints:
            exact = c.exact()
            self.log(f"cost/{c.name}_exact", exact)
            self.log(f"cost/{c.name}_budget", c.budget)
        self.log("val/feasible", float(all(c.satisfied() for c in self.constraints)))

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.model.weight_parameters(), "lr": self.lr}]

    def configure_optimizers(self) -> dict[str, Any]:
        logits = [p for p in self.model.logit_parameters() if p.requires_grad]
        self.logit_optimizer = self.logit_optimizer_factory([{"params": logits, "lr": self.logit_lr, "weight_decay": 0.0}])
        if self._pending_logit_state is not None:
            self.logit_optimizer.load_state_dict(self._pending_logit_state)
            self._pending_logit_state = None
        return super().configure_optimizers()
