"""The precision assignment: each quantized layer's weight scheme and input scheme.

Read from a model with :meth:`Assignment.of` (every quantizer's argmax) and written into one
with :meth:`Assignment.apply` (every quantizer's :meth:`~HMQQuantizer.fix`).  precision.yaml
and the packed checkpoint's metadata store :meth:`Assignment.to_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from hmqsearch.errors import UserError
from hmqsearch.quant.hmq import HMQQuantizer
from hmqsearch.quant.prepare import QuantModel
from hmqsearch.quant.scheme import Scheme

FLOAT_ENTRY = {"bits": "float"}


class LayerSchemes(NamedTuple):
    """One layer's weight and input schemes; None where the tensor stays float."""

    weight: Scheme | None
    input: Scheme | None


@dataclass(frozen=True, eq=False)
class Assignment(Mapping[str, LayerSchemes]):
    """Layer name -> :class:`LayerSchemes`, in the model's layer order; immutable, and equal to
    any mapping with the same entries."""

    layers: Mapping[str, LayerSchemes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    def __getitem__(self, name: str) -> LayerSchemes:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def of(cls, qmodel: QuantModel) -> Assignment:
        """The argmax assignment of ``qmodel``."""
        return cls({name: LayerSchemes(layer.wq.argmax(), layer.aq.argmax()) for name, layer in qmodel.layers()})

    def apply(self, qmodel: QuantModel, source: str = "the assignment") -> None:
        """Make this the argmax assignment of ``qmodel`` (layer names must match exactly);
        ``source`` names it in the messages of a mismatch."""
        check_same_layers(qmodel, self, source)
        for name, layer in qmodel.layers():
            _fix(layer.wq, self[name].weight, f"{source}: {name}.weight")
            _fix(layer.aq, self[name].input, f"{source}: {name}.input")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The ``layers`` mapping of precision.yaml: per layer a ``weight`` and an ``input`` entry."""
        return {
            name: {"weight": _entry(s.weight), "input": _entry(s.input)} for name, s in self.items()
        }

    @classmethod
    def from_dict(cls, layers: Mapping[str, Any], source: str = "the assignment") -> Assignment:
        """Inverse of :meth:`to_dict`; a malformed entry is a :class:`UserError` naming ``source``."""
        return cls({
            name: LayerSchemes(*(_parse(entry, part, f"{source}: {name}.{part}") for part in ("weight", "input")))
            for name, entry in layers.items()
        })


def check_same_layers(qmodel: QuantModel, layers: Iterable[str], source: str) -> None:
    """A :class:`UserError` naming ``source`` unless ``layers`` are exactly ``qmodel``'s layer names."""
    names, given = {n for n, _ in qmodel.layers()}, set(layers)
    missing, extra = sorted(names - given), sorted(given - names)
    if missing or extra:
        raise UserError(
            f"{source} does not match the model: layers missing from it {missing[:5]}, "
            f"layers unknown to the model {extra[:5]}"
        )


def _entry(scheme: Scheme | None) -> dict[str, Any]:
    return dict(FLOAT_ENTRY) if scheme is None else scheme.to_dict()


def _parse(layer: Any, part: str, where: str) -> Scheme | None:
    entry = layer.get(part) if isinstance(layer, Mapping) else None
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: no scheme ({layer!r})")
    if entry.get("bits") == "float":
        return None
    try:
        return Scheme.from_dict(dict(entry))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: malformed scheme {dict(entry)!r} ({exc})") from exc


def _fix(q: HMQQuantizer, scheme: Scheme | None, where: str) -> None:
    try:
        q.fix(scheme)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from exc
