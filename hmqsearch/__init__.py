"""hmqsearch: differentiable mixed-precision quantization search.

The Python API (:mod:`hmqsearch.api`), imported on first use so that ``import hmqsearch.<module>``
stays light::

    import hmqsearch
    result = hmqsearch.quantize(model, train_loader, test_loader, "out", budget=hmqsearch.Budget(weight_compression=8))
    qmodel = hmqsearch.load_packed("out/model.packed", MyModel())
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **{name: "hmqsearch.api" for name in (
        "Budget", "Result", "SearchReport", "accuracy", "calibrate", "export_model", "finetune", "fit_float", "prepare",
        "quantize", "search",
    )},
    "load_packed": "hmqsearch.export.packed",
    "Pin": "hmqsearch.quant.prepare",
    "QuantSpec": "hmqsearch.quant.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hmqsearch' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
