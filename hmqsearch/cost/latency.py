"""Latency tables: LUT[layer][weight bits][activation bits] -> milliseconds.

A table comes either from the analytic model of a named target (this module) or from a
measurement on the current device (the profiler writes the same JSON format).  Expected
latency under the logits is sum_l sum_(bw, ba) p_l(bw) p_l(ba) LUT[l][bw][ba].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from hmqsearch.errors import UserError
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import QuantModel

FLOAT_BITS = 32


@dataclass(frozen=True)
class Target:
    """An integer accelerator: 8x8-bit MAC throughput and memory bandwidth.

    Compute time scales with bit operations (BOPs = MACs * bw * ba), so a 4x4-bit MAC costs a
    quarter of an 8x8 one; memory time is the bytes moved (weights at bw bits, input at ba
    bits, int8 output) over the bandwidth.  A layer takes whichever is larger.
    """

    name: str
    int8_macs_per_s: float
    bytes_per_s: float

    def layer_ms(self, macs: int, weights: int, in_elems: int, out_elems: int, bw: int, ba: int) -> float:
        compute_s = macs * bw * ba / (64.0 * self.int8_macs_per_s)
        memory_s = (math.ceil(weights * bw / 8) + math.ceil(in_elems * ba / 8) + out_elems) / self.bytes_per_s
        return 1e3 * max(compute_s, memory_s)


@dataclass
class LatencyTable:
    """Per-layer latency table; ``ms[layer][i][j]`` is the time at (w_bits[i], a_bits[j]).

    ``overhead_ms`` is what the whole network costs beyond its layers' entries (adds, pooling,
    layout changes, minus quantize steps that chained integer kernels skip): the profiler
    measures it on the whole graph, so that overhead + sum of entries predicts the graph.
    ``batch``/``threads``: what a measured table was timed at (None for analytic tables).
    """

    source: str  # "analytic:<target>" or "measured:<device>"
    w_bits: dict[str, list[int]]
    a_bits: dict[str, list[int]]
    ms: dict[str, list[list[float]]]
    overhead_ms: float = 0.0
    batch: int | None = None
    threads: int | None = None
    _luts: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def lut(self, layer: str, device: torch.device) -> Tensor:
        """``ms[layer]`` as a float32 tensor on ``device``, made once: building it every step
        would copy from the host and wait for the GPU."""
        key = (layer, device)
        if key not in self._luts:
            self._luts[key] = torch.tensor(self.ms[layer], dtype=torch.float32, device=device)
        return self._luts[key]

    def lookup(self, layer: str, bw: int | None, ba: int | None) -> float:
        bw = FLOAT_BITS if bw is None else bw
        ba = FLOAT_BITS if ba is None else ba
        try:
            return self.ms[layer][self.w_bits[layer].index(bw)][self.a_bits[layer].index(ba)]
        except (KeyError, ValueError) as exc:
            raise UserError(
                f"latency table ({self.source}) has no entry for layer {layer!r} at W{bw}A{ba}; "
                f"it covers layers {sorted(self.ms)[:5]}... at weight bits {self.w_bits.get(layer)} "
                f"and activation bits {self.a_bits.get(layer)}"
            ) from exc

    def save(self, path: str | Path) -> None:
        from hmqsearch.io import atomic_write_text

        atomic_write_text(path, json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.init}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"latency table {p} does not exist; write one with `hmqsearch profile`")
        try:
            data = json.loads(p.read_text())
            return cls(
                data["source"], data["w_bits"], data["a_bits"], data["ms"],
                float(data.get("overhead_ms", 0.0)), data.get("batch"), data.get("threads"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"latency table {p} is not a valid table ({exc})") from exc


def latency_bits(q) -> list[int]:  # noqa: ANN001 - HMQQuantizer
    """A quantizer's candidate bit-widths as latency tables index them (float counts as 32)."""
    return [FLOAT_BITS] if q.float_pinned else list(q.candidate_bits)


def analytic_table(qmodel: QuantModel, target: Target) -> LatencyTable:
    """Analytic table over every layer's candidate bit-widths (float counts as 32 bits)."""
    w_bits, a_bits, ms = {}, {}, {}
    for name, layer in qmodel.layers():
        wb, ab = latency_bits(layer.wq), latency_bits(layer.aq)
        s = layer.shape
        w_bits[name], a_bits[name] = wb, ab
        ms[name] = [
            [target.layer_ms(s.macs, layer.weights_read(), s.in_elements, s.out_elements, bw, ba) for ba in ab]
            for bw in wb
        ]
    return LatencyTable(f"analytic:{target.name}", w_bits, a_bits, ms)


def expected_latency(qmodel: QuantModel, table: LatencyTable) -> Tensor:
    """sum_l p_l(bw)^T LUT_l p_l(ba); differentiable w.r.t. the logits."""
    terms = []
    for name, layer in qmodel.layers():
        lut = table.lut(name, layer.wq.bits.device)
        pw = _probs_over(layer.wq, table.w_bits[name])
        pa = _probs_over(layer.aq, table.a_bits[name])
        terms.append(pw @ lut @ pa)
    return torch.stack(terms).sum() + table.overhead_ms


def _probs_over(q, table_bits: list[int]) -> Tensor:  # noqa: ANN001 - HMQQuantizer
    """The quantizer's bit marginals ordered as the table's bit list."""
    if q.float_pinned:
        return q.bits.new_ones(1)
    cand = q.candidate_bits
    missing = [b for b in cand if b not in table_bits]
    if missing:
        raise UserError(f"latency table lacks bit-widths {missing}; it has {table_bits}")
    p = q.bit_probs()
    return torch.stack([p[cand.index(b)] if b in cand else p.new_zeros(()) for b in table_bits])


def exact_latency(qmodel: QuantModel, table: LatencyTable) -> dict[str, float]:
    """Per-layer table latency of the argmax assignment."""
    return {
        name: table.lookup(name, *(None if s is None else s.bits for s in schemes))
        for name, schemes in Assignment.of(qmodel).items()
    }


def exact_total_latency(qmodel: QuantModel, table: LatencyTable) -> float:
    """Table latency of the argmax assignment: the layers' entries plus the table's overhead."""
    return float(sum(exact_latency(qmodel, table).values())) + table.overhead_ms


def min_latency(qmodel: QuantModel, table: LatencyTable) -> float:
    """The lowest table latency any assignment can reach: each layer at its fastest candidate.

    On an analytic table that is the lowest precision; on a measured one not always (an 8-bit
    input can run as an integer kernel where a 4-bit one cannot).
    """
    return table.overhead_ms + sum(min(min(row) for row in table.ms[name]) for name, _ in qmodel.layers())


LATENCY_MODELS = ("analytic", "measured", "none")


def build_latency_table(qmodel: QuantModel, kind: str, target: dict | None, table_path: str | None) -> LatencyTable | None:
    """The latency table the config asks for: ``analytic`` (named target), ``measured`` (file), ``none``."""
    if kind == "analytic":
        try:
            return analytic_table(qmodel, Target(**(target or {})))
        except TypeError as exc:
            raise UserError(f"cost.target={target!r} is not a target ({exc}); it needs name, int8_macs_per_s, bytes_per_s") from exc
    if kind == "measured":
        if not table_path:
            raise UserError("cost.latency=measured needs cost.latency_table=<path of a table written by `hmqsearch profile`>")
        return LatencyTable.load(table_path)
    if kind in ("none", None):
        return None
    raise UserError(f"cost.latency={kind!r}; allowed: {', '.join(LATENCY_MODELS)}")
