"""Batch-norm running statistics recomputed for the assignment a quantized model now uses.

The search trains with the relaxed quantizer: every forward pass mixes Gumbel-sampled
candidates, so the batch norms' running statistics average over outputs the chosen (argmax)
assignment never produces. Where batch norm is kept (``search.fold_bn=false``) the argmax model
evaluated with those statistics is far off what it can do (ResNet-20 at 16x: 35.65 % top-1,
85.86 % after recomputing them on 4 batches, 87.55 % on 20; docs/benchmark.md). The fine-tune
refreshes them as it trains, but the figure before it, a run without fine-tune epochs and its
export would otherwise keep them.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

log = logging.getLogger(__name__)


def reestimate_batch_norm(model: nn.Module, loader: Iterable[Any], batches: int) -> int:
    """Recompute every batch norm's running mean and variance as the average over the first
    ``batches`` batches of ``loader`` (``(inputs, labels)`` pairs or inputs), the model as it now
    is. Returns the number of batches used (0: no batch norm or ``batches`` is 0, nothing done)."""
    if batches <= 0 or not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return 0
    taken = list(itertools.islice(loader, batches))
    update_bn(taken, model, device=next(model.parameters()).device)  # restores the training flag
    log.info("batch-norm statistics re-estimated on %d training batches for the chosen assignment", len(taken))
    return len(taken)
