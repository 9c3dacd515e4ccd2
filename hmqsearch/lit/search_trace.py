"""What the search did: the argmax assignment and its probability over the steps.

A record holds, for every searched quantizer, the argmax bit-width and the probability of
that bit-width (the marginal over thresholds). Records are kept as device tensors and read
on the host once an epoch, so recording adds no GPU synchronisation to a search step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel

RECORDS_PER_SEARCH = 40  # points of the bit-width-over-the-search chart


class SearchTrace:
    """Argmax bit-widths and their probabilities, recorded about ``RECORDS_PER_SEARCH`` times."""

    def __init__(self, qmodel: QuantModel) -> None:
        self.quantizers: dict[str, HMQQuantizer] = {
            name: q for name, q in qmodel.quantizers() if not q.float_pinned and len(q.candidate_bits) > 1
        }
        self.start = self._host(self._snapshot())
        self.history: list[dict[str, Any]] = []  # host records
        self._pending: list[tuple[int, float, float, list[float | None], Tensor]] = []

    def _snapshot(self) -> Tensor:
        """(2, n) tensor: argmax bits and their probability of every traced quantizer."""
        if not self.quantizers:
            return torch.zeros(2, 0)
        rows = []
        for q in self.quantizers.values():
            probs = q.bit_probs().detach()
            idx = probs.argmax()
            rows.append(torch.stack([q.bits[idx], probs[idx]]))
        return torch.stack(rows, dim=1)

    def _host(self, snapshot: Tensor) -> dict[str, tuple[int, float]]:
        bits, probs = snapshot.cpu().tolist() if snapshot.numel() else ([], [])
        return {name: (int(b), float(p)) for name, b, p in zip(self.quantizers, bits, probs)}

    def maybe_record(self, step: int, total: int, tau: float, bounds: list[float | None]) -> None:
        every = max(1, total // RECORDS_PER_SEARCH)
        if step % every == 0 or step == total:
            self._pending.append((step, step / max(total, 1), tau, list(bounds), self._snapshot()))

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        """Move the epoch's records to the host and return the assignment at the epoch's end."""
        for step, progress, tau, bounds, snap in self._pending:
            self.history.append({"step": step, "progress": progress, "tau": tau, "bounds": bounds,
                                 "assignment": self._host(snap)})
        self._pending.clear()
        entry = {"epoch": epoch, "assignment": self._host(self._snapshot())}
        self.history.append({**entry, "step": None})
        return entry

    def describe(self, entry: dict[str, Any]) -> str:
        """One log line: the weight bits of the argmax, how many moved, the least sure layer."""
        assignment = entry["assignment"]
        if not assignment:
            return "nothing searched"
        weights = [b for name, (b, _) in assignment.items() if name.endswith(".weight")]
        moved = sum(assignment[n][0] != self.start[n][0] for n in assignment)
        name, (bits, p) = min(assignment.items(), key=lambda kv: kv[1][1])
        return (f"argmax weight bits {weights}; {moved} of {len(assignment)} quantizers moved from the start; "
                f"least sure {name} {bits} bits at p={p:.2f}")

    def moved(self, final: dict[str, int]) -> list[str]:
        """Quantizers whose bit-width in ``final`` differs from the start."""
        return [n for n, bits in final.items() if n in self.start and self.start[n][0] != bits]

    def argmax_bits(self) -> dict[str, int]:
        return {name: bits for name, (bits, _) in self._host(self._snapshot()).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = {k: tuple(v) for k, v in state["start"].items()}
        self.history = list(state["history"])
