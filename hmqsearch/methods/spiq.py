"""SPIQ as a data-free method (``method=spiq``): no training, no calibration data.

Yvinec, Dapogny, Cord, Bailly, arXiv 2203.14642.  Every layer's per-channel input range comes
from the batch norms' statistics (:mod:`hmqsearch.quant.bn_ranges`: ``beta -+ k |gamma|``
propagated through the float network); SPIQ's static input scaling
(:mod:`hmqsearch.quant.spiq`) folds each channel's range into the weights so that one
per-tensor power-of-two step quantizes every channel.  The assignment is then fixed as in
``benchmarks/spiq_table.py``: weights per output channel at their lowest-MSE power-of-two
threshold on the folded weights, inputs at the smallest power of two covering the common
range; the network input keeps ``search.first_layer_act_bits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from hmqsearch.errors import UserError
from hmqsearch.methods.base import Method, Precision, Prepared, as_precision
from hmqsearch.methods.fixed import assign_fixed
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.bn_ranges import DEFAULT_K, ChannelRange, input_ranges
from hmqsearch.quant.spiq import apply_spiq


@dataclass(frozen=True)
class SPIQ(Method):
    """Data-free static per-channel input quantization at ``precision`` (``WxAy``).

    ``k``: the range rule ``beta -+ k |gamma|``; ``power_of_two``: round every input scale up
    to a power of two (exact division, every deployed scale a power of two).
    """

    name: ClassVar[str] = "spiq"
    calibrates: ClassVar[bool] = False
    precision: Precision | str = "W8A8"
    k: float = DEFAULT_K
    power_of_two: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", as_precision(self.precision))
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not (math.isfinite(self.k) and self.k > 0):
            raise UserError(f"method.k={self.k!r}; allowed: a number > 0 (the range beta -+ k |gamma|)")
        if not isinstance(self.power_of_two, bool):
            raise UserError(f"method.power_of_two={self.power_of_two!r}; allowed: true, false")

    def check(self, net: nn.Module, input_mean: Sequence[float] | None, input_std: Sequence[float] | None) -> None:
        """The data-free ranges can be read from ``net`` (traceable, every operation known) and
        the data declares its input normalisation."""
        self._ranges(net, input_mean, input_std)

    def assign(self, prepared: Prepared) -> Assignment:
        """Fold the batch-norm ranges into ``prepared.qmodel`` and fix its single precision."""
        ranges = self._ranges(prepared.net, prepared.input_mean, prepared.input_std)
        apply_spiq(prepared.qmodel, ranges, self.power_of_two)
        return assign_fixed(prepared.qmodel, weights_covering=False, inputs_covering=True)

    def _ranges(
        self, net: nn.Module, input_mean: Sequence[float] | None, input_std: Sequence[float] | None
    ) -> dict[str, ChannelRange]:
        if input_mean is None or input_std is None:
            raise UserError("method=spiq needs the data's input normalisation: a data module with mean and std")
        try:
            return input_ranges(net, input_mean, input_std, self.k)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "no data-free ranges"
            raise UserError(f"method=spiq needs a torch.fx-traceable network: {str(exc).splitlines()[0]}") from exc
