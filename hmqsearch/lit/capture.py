"""The training step's network forward and backward through ``torch.compile`` (``step_capture``).

On a GPU a small network's search step is bound by launches and per-op Python: each HMQ
quantizer's forward is about 20 small kernels (candidate table, Gumbel sample, expected step
and bounds). ``step_capture=compile`` hands the model's forward to ``torch.compile`` (Inductor
fuses those elementwise chains, the fake-quant op stays one opaque custom op, AOTAutograd
compiles the backward); ``step_capture=cuda-graphs`` compiles with
``mode="reduce-overhead"``, which also replays the fused kernels as CUDA graphs (GPU only).
The loss, the Lagrangian, the optimizer steps and the dual ascent stay eager, so the duals,
the temperature and every checkpoint entry are the eager ones; the compiled forward reads the
same parameters and buffers (``tau`` is updated in place), and its Gumbel noise comes from
the same global generator that checkpoints save, though not as the same numbers as eager
(``torch._inductor.config.fallback_random = True`` makes them equal, as the tests do).

The module keeps its own ``model`` attribute and state-dict keys: the compiled callable is
not registered as a submodule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor

from hmqsearch.errors import UserError

log = logging.getLogger(__name__)

CAPTURE_MODES = ("none", "compile", "cuda-graphs")
_COMPILE_MODE = {"compile": "default", "cuda-graphs": "reduce-overhead"}


def check_capture(mode: str, device: torch.device) -> None:
    """Refuse CUDA graphs off a GPU (the schema refuses a ``step_capture`` not in :data:`CAPTURE_MODES`)."""
    if mode == "cuda-graphs" and device.type != "cuda":
        raise UserError(
            f"step_capture=cuda-graphs replays CUDA graphs, but this run trains on {device.type}; "
            "allowed here: none, compile"
        )


def capture_forward(module: pl.LightningModule, mode: str) -> None:
    """Route ``module(x)`` (its ``forward``: ``self.model(x)``) through the compiled model;
    ``mode`` is checked by :func:`check_capture` first. Under CUDA graphs every call starts a
    new graph step (the previous call's outputs are no longer read)."""
    if mode == "none":
        return
    compiled: Callable[[Tensor], Tensor] = torch.compile(module.model, mode=_COMPILE_MODE[mode])

    def forward(x: Tensor) -> Tensor:
        if mode == "cuda-graphs":
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    module.forward = forward  # an instance attribute: not a submodule, state-dict keys unchanged
    log.info("step_capture=%s: %s forward through torch.compile(mode=%r)", mode, type(module).__name__,
             _COMPILE_MODE[mode])
