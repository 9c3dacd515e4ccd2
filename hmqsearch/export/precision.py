"""``precision.yaml``: the searched per-layer assignment, readable by people and by hmqsearch.

It holds an :class:`~hmqsearch.quant.assignment.Assignment` (per layer, the weight and input
schemes: bits, power-of-two threshold exponents, signedness, container), plus the budgets, the
exact costs, the accuracy and the config it came from.  :func:`apply_precision` feeds it back
into a prepared model to fine-tune or export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hmqsearch.errors import UserError
from hmqsearch.io import write_yaml
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import QuantModel

FORMAT_VERSION = 1


def write_precision(path: str | Path, assignment: Assignment, **sections: Any) -> Path:
    """Write the assignment plus any extra sections (budgets, costs, accuracy, config)."""
    data = {"format_version": FORMAT_VERSION, "layers": assignment.to_dict(), **sections}
    return write_yaml(path, data)


def read_precision(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"precision file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"precision file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise UserError(f"precision file {p} has no 'layers' mapping; is it a hmqsearch precision.yaml?")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"precision file {p} has format_version={data.get('format_version')!r}; this hmqsearch reads {FORMAT_VERSION}"
        )
    return data


def apply_precision(qmodel: QuantModel, data: dict[str, Any], source: str = "precision.yaml") -> None:
    """Make ``data['layers']`` (a precision file's) the argmax assignment of ``qmodel``."""
    Assignment.from_dict(data["layers"], source).apply(qmodel, source)
