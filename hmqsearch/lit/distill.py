"""Knowledge distillation from the float model into the quantized one (Hinton et al., 2015).

Short quantization-aware training on a small data budget recovers more accuracy when the
student matches the float teacher's softened outputs than from the hard labels alone: the
teacher's logits carry the similarity between classes, a denser signal per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmqsearch.errors import UserError
from hmqsearch.inputs import Inputs, device_of, run_model

STAGES = ("search", "finetune")


@dataclass(frozen=True)
class DistillSpec:
    """``loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)``."""

    enabled: bool = False
    alpha: float = 0.9
    temperature: float = 4.0
    stages: tuple[str, ...] = STAGES

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"distill.alpha={self.alpha}; allowed: a number in [0, 1]")
        if not self.temperature > 0.0:
            raise UserError(f"distill.temperature={self.temperature}; allowed: a number > 0")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise UserError(f"distill.stages={list(self.stages)}; allowed entries: {', '.join(STAGES)}")

    def applies_to(self, stage: str) -> bool:
        return self.enabled and stage in self.stages


class Distiller:
    """The frozen teacher and the distillation loss.

    The teacher is held outside the student's module tree, so it is neither trained, nor
    saved in checkpoints, nor wrapped by DDP; it follows the batch to its device.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float) -> None:
        self._teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    @torch.no_grad()
    def teacher_logits(self, x: Inputs) -> Tensor:
        first = next(self._teacher.parameters(), None)
        if first is not None and first.device != device_of(x):
            self._teacher.to(device_of(x))
        return run_model(self._teacher, x)

    def loss(self, student_logits: Tensor, x: Inputs, y: Tensor) -> Tensor:
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=1), F.log_softmax(self.teacher_logits(x) / t, dim=1),
            reduction="batchmean", log_target=True,
        )
        hard = F.cross_entropy(student_logits, y)
        return (1.0 - self.alpha) * hard + self.alpha * t * t * soft
