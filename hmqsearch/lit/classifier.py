"""LightningModule for float training and quantization-aware fine-tuning of a classifier."""

from __future__ import annotations

from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from hmqsearch.inputs import Inputs, run_model
from hmqsearch.lit.distill import Distiller

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training with torchmetrics top-1 on the validation and test sets.

    Used for the float ``pretrain`` stage and the ``finetune`` stage (frozen assignment, QAT).
    The learning rate follows a cosine schedule over the stage's steps. With a ``distiller``
    the training loss mixes in distillation from the float teacher; validation stays plain
    cross-entropy, so checkpoint selection sees the same metric either way.
    """

    def __init__(
        self, model: nn.Module, num_classes: int, optimizer: OptimizerFactory, lr: float,
        distiller: Distiller | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.distiller = distiller
        self.optimizer_factory = optimizer
        self.lr = lr
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Inputs) -> Tensor:
        """The model's logits on inputs ``x`` (a tensor, tuple or dict of tensors: :mod:`hmqsearch.inputs`)."""
        return run_model(self.model, x)

    def task_loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def train_loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """The training objective: cross-entropy, or the distillation loss with a teacher."""
        if self.distiller is None:
            return self.task_loss(batch)
        x, y = batch
        logits = self(x)
        return self.distiller.loss(logits, x, y), logits, y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, logits, y = self.train_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, y = self.task_loss(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        _, logits, y = self.task_loss(batch)
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.lr}]

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.optimizer_factory(self.param_groups())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
