"""``precision.yaml``: the searched per-layer assignment, readable by people and by hmqsearch.

It holds, per layer, the weight and input schemes (bits, power-of-two threshold exponents,
signedness, container), plus the budgets, the exact costs, the accuracy and the config it
came from.  :func:`apply_precision` feeds it back into a prepared model to fine-tune or export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from hmqsearch.cost.size import container_bits
from hmqsearch.errors import UserError
from hmqsearch.io import write_yaml
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel

FORMAT_VERSION = 1


def _scheme_entry(q: HMQQuantizer) -> dict[str, Any]:
    if q.float_pinned:
        return {"bits": "float"}
    s = q.scheme()
    signed = "int" if s.signed else "uint"
    exps = list(s.threshold_exp)
    return {
        "bits": s.bits,
        "signed": s.signed,
        "per_channel": q.per_channel_axis is not None,
        "threshold_exp": exps if q.per_channel_axis is not None else exps[0],
        "container": f"{signed}{container_bits(s.bits)}",
    }


def assignment(qmodel: QuantModel) -> dict[str, dict[str, Any]]:
    """Per-layer weight and input schemes of the argmax assignment."""
    return {name: {"weight": _scheme_entry(layer.wq), "input": _scheme_entry(layer.aq)} for name, layer in qmodel.layers()}


def write_precision(path: str | Path, qmodel: QuantModel, **sections: Any) -> Path:
    """Write the assignment plus any extra sections (budgets, costs, accuracy, config)."""
    data = {"format_version": FORMAT_VERSION, "layers": assignment(qmodel), **sections}
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


def _apply_scheme(q: HMQQuantizer, entry: dict[str, Any], where: str) -> None:
    if entry.get("bits") == "float":
        if not q.float_pinned:
            raise UserError(f"{where}: precision file says float but the model quantizes this tensor")
        return
    try:
        bits, signed, exps = int(entry["bits"]), bool(entry["signed"]), entry["threshold_exp"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: malformed scheme {entry!r} ({exc})") from exc
    if bits not in q.candidate_bits:
        raise UserError(f"{where}: bits={bits} is not a candidate here (allowed {list(q.candidate_bits)})")
    exps_t = torch.as_tensor(exps if isinstance(exps, list) else [exps], dtype=torch.float32)
    if exps_t.numel() not in (1, q.base_exp.numel()):
        raise UserError(f"{where}: {exps_t.numel()} threshold exponents for {q.base_exp.numel()} channels")
    q.base_exp.copy_((exps_t - 1.0).expand_as(q.base_exp))
    q.signed = signed
    q.fix_to(bits, 0)


def apply_precision(qmodel: QuantModel, data: dict[str, Any], source: str = "precision.yaml") -> None:
    """Make ``data['layers']`` the argmax assignment of ``qmodel`` (names must match exactly)."""
    layers = data["layers"]
    names = [n for n, _ in qmodel.layers()]
    missing, extra = sorted(set(names) - set(layers)), sorted(set(layers) - set(names))
    if missing or extra:
        raise UserError(
            f"{source} does not match the model: layers missing from the file {missing[:5]}, "
            f"layers unknown to the model {extra[:5]}"
        )
    for name, layer in qmodel.layers():
        _apply_scheme(layer.wq, layers[name]["weight"], f"{source}: {name}.weight")
        _apply_scheme(layer.aq, layers[name]["input"], f"{source}: {name}.input")
