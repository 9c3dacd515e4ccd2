"""A discrete quantization scheme: what one quantizer applies once its (bits, threshold) is chosen.

The one type for a chosen scheme: the quantizer's argmax (:meth:`HMQQuantizer.argmax`), the
cost models, precision.yaml, the packed checkpoint and the ONNX export all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from hmqsearch.quant.functional import int_range, step_shift

INT4_MAX_BITS = 4  # widths up to this are stored as int4 in the graph, wider ones as int8


def container_bits(bits: int) -> int:
    """Storage bits of a ``bits``-wide value in the deployment graph: int4 for 1-4, int8 for 5-8."""
    return 4 if bits <= INT4_MAX_BITS else 8


@dataclass(frozen=True)
class Scheme:
    """Bit-width, signedness and power-of-two thresholds t = 2^e: one exponent per output channel
    when ``per_channel``, else one."""

    bits: int
    signed: bool
    threshold_exp: tuple[int, ...]
    per_channel: bool = False

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed)

    @property
    def steps(self) -> np.ndarray:
        """float32 steps d = t / 2^(b-1) signed, t / 2^b unsigned, t / 2 binary: exact powers of two."""
        shift = step_shift(self.bits, self.signed)
        return np.array([2.0 ** (e - shift) for e in self.threshold_exp], dtype=np.float32)

    @property
    def container_bits(self) -> int:
        return container_bits(self.bits)

    @property
    def fills_container(self) -> bool:
        """True when the integer range is the whole container's (no extra clamp needed)."""
        return self.bits == self.container_bits

    def at_bits(self, bits: int) -> Scheme:
        return replace(self, bits=bits)

    def to_dict(self) -> dict[str, Any]:
        """The precision.yaml entry: one exponent as a scalar unless per channel."""
        exps = list(self.threshold_exp)
        return {
            "bits": self.bits,
            "signed": self.signed,
            "per_channel": self.per_channel,
            "threshold_exp": exps if self.per_channel else exps[0],
            "container": f"{'int' if self.signed else 'uint'}{self.container_bits}",
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Scheme:
        """Inverse of :meth:`to_dict` (``container`` and ``per_channel`` follow from the rest);
        raises KeyError, TypeError or ValueError on a malformed entry."""
        bits, signed, exps = int(entry["bits"]), bool(entry["signed"]), entry["threshold_exp"]
        per_channel = isinstance(exps, list)
        return cls(bits, signed, tuple(int(e) for e in (exps if per_channel else [exps])), per_channel)
