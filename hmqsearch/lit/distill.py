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

from hmqsearch.settings import POSITIVE, Each, Number, OneOf, Real, check_fields, setting
from hmqsearch.inputs import Inputs, device_of, run_model

STAGES = ("search", "finetune")


@dataclass
class DistillSpec:
    """``loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)``."""

    enabled: bool = False
    alpha: Real = setting(0.9, Number(low=0, high=1))  # weight of the distillation term
    temperature: Real = setting(4.0, POSITIVE)  # softmax temperature of teacher and student
    stages: tuple[str, ...] = setting(STAGES, Each(OneOf(STAGES)))

    def validate(self) -> None:
        check_fields(self, "distill")

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
