"""The export's options (``export.*`` of the configuration, ``options`` of the Python API's
``export_model``): their defaults and allowed values, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from hmqsearch.settings import AT_LEAST_ONE, COUNT, Number, OneOf, Real, setting
from hmqsearch.export.onnx_export import FORMS

PERCENT = Number(low=0, high=100)


@dataclass
class ExportOptions:
    """How a final assignment is exported, verified and timed (:mod:`hmqsearch.export.deploy`)."""

    form: str = setting("onnxruntime", OneOf(FORMS))  # onnxruntime (tuned for its integer kernels) | portable (DQ on every weight)
    tolerance_agreement: Real = setting(99.5, PERCENT)  # min % top-1 agreement of the graph (no optimizations) with PyTorch
    tolerance_runtime_agreement: Real = setting(99.5, PERCENT)  # the same for onnxruntime with all optimizations (integer kernels)
    verify_samples: int = setting(10000, AT_LEAST_ONE)  # test samples to verify on (the whole test set up to this many)
    # whole-graph latency measurement (median); a measured latency table's own batch and threads win,
    # so that the table's prediction and the measurement are comparable
    latency_batch: int = setting(1, AT_LEAST_ONE)
    latency_warmup: int = setting(5, COUNT)
    latency_repeats: int = setting(20, AT_LEAST_ONE)
    latency_threads: int = setting(1, COUNT)  # 0: onnxruntime's choice
    compare_float: bool = True  # also time the float32 graph of the same network
