"""Multi-process helpers: which rank writes, and whether the ranks hold the same search state."""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning_fabric.utilities.rank_zero import rank_zero_only
from torch import Tensor


def is_rank_zero() -> bool:
    """True in a single process and on global rank 0 of a DDP run: the only writer of artifacts."""
    return rank_zero_only.rank == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_disagreement(state: dict[str, Tensor]) -> dict[str, float] | None:
    """Largest absolute difference of each tensor between any rank and rank 0 (all-gathered);
    None in a single process."""
    if world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for name, tensor in state.items():
        flat = tensor.detach().float().reshape(-1).to(device)
        gathered = [torch.empty_like(flat) for _ in range(world_size())]
        dist.all_gather(gathered, flat)
        out[name] = max(float((g - gathered[0]).abs().max()) if g.numel() else 0.0 for g in gathered)
    return out
