"""Top-1 accuracy of a model on a loader, on a chosen device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from hmqsearch.inputs import run_model, to_device
from hmqsearch.lit.device import on_device


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, num_classes: int, device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent, computed on ``device`` (default: the CPU); the model is left
    in eval mode where it was."""
    device = device or torch.device("cpu")
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    with on_device(model, device):
        model.eval()
        for x, y in loader:
            acc.update(run_model(model, to_device(x, device)), y.to(device))
    return 100.0 * float(acc.compute())
