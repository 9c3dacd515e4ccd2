"""Stop training at the first non-finite loss or gradient, naming the step and the layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
import torch
from torch import Tensor, nn

from hmqsearch.errors import RunHalted
from hmqsearch.inputs import Inputs, run_model


def first_nonfinite_layer(model: nn.Module, inputs: Inputs) -> str | None:
    """Re-run ``inputs`` through ``model`` and return the first leaf module (in execution order)
    whose output holds a NaN or an infinity."""
    found: list[str] = []

    def check(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not found and isinstance(output, Tensor) and not torch.isfinite(output).all():
                found.append(name)
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(check(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def kept_checkpoints(stage_dir: Path) -> str:
    """What a stopped stage leaves to continue from, naming only files that exist: the stage's
    own checkpoints, else those of the stages before it (folders beside ``stage_dir``)."""
    own = sorted(stage_dir.glob("*.ckpt"))
    if own:
        return "the last good checkpoint is kept: " + ", ".join(str(p) for p in own)
    earlier = sorted(stage_dir.parent.glob("*/*.ckpt"))
    if earlier:
        return (f"no {stage_dir.name} checkpoint was written yet; the earlier stages' checkpoints are kept: "
                + ", ".join(str(p) for p in earlier))
    return "no checkpoint was written yet"


class NonFiniteGuard(Callback):
    """Checks the loss before backward and every gradient before the optimizer step.

    It raises :class:`RunHalted` before the bad step is applied, and Lightning's checkpoint
    callbacks run after this one, so ``last.ckpt`` stays the last good state.
    """

    def __init__(self, stage: str, dirpath: str | Path) -> None:
        self.stage, self.checkpoint_dir = stage, Path(dirpath)
        self._inputs: Inputs | None = None
        self._loss_problem: tuple[str, str | None] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._inputs = batch[0] if isinstance(batch, (list, tuple)) else None

    def _halt(self, trainer: pl.Trainer, what: str, layer: str | None) -> None:
        where = f" in layer {layer}" if layer else ""
        raise RunHalted(
            f"non-finite {what} at {self.stage} step {trainer.global_step} (epoch {trainer.current_epoch}){where}; "
            f"training stopped; {kept_checkpoints(self.checkpoint_dir)}"
        )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if torch.isfinite(loss).all():
            return
        model = getattr(pl_module, "model", pl_module)
        layer = first_nonfinite_layer(model, self._inputs) if self._inputs is not None else None
        self._loss_problem = (f"loss ({loss.item()})", layer)
        if trainer.world_size == 1:
            self._halt(trainer, *self._loss_problem)
        # Under DDP the loss is per rank: halting here alone would leave the other ranks waiting in
        # the gradient all-reduce. The all-reduced gradients are non-finite on every rank, so
        # every rank stops together in on_before_optimizer_step.

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        # one host read for all gradients: one per parameter would wait for the GPU each time
        if not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
            return
        for name, grad in grads:
            if not torch.isfinite(grad).all():
                if self._loss_problem is not None:
                    self._halt(trainer, *self._loss_problem)
                self._halt(trainer, f"gradient (parameter {name})", name.rsplit(".", 1)[0].removeprefix("model."))
