"""What a setting allows, declared beside its type and default in a dataclass schema.

A field made with :func:`setting` carries a rule in its metadata (:class:`Number`,
:class:`OneOf`, :class:`Each`); :func:`check_fields` checks a dataclass instance against them
and :func:`check_mapping` a plain nested mapping: ranges, choices, and that no number is NaN or
infinite (Hydra reads ``nan`` and ``inf`` as floats, which pass every ``<`` and ``>``
comparison).  Each refusal is one :class:`UserError` naming the key, the value and what is
allowed.  This module knows no config system, so the specs of every layer (budgets, ramp,
distillation, export options) declare their rules here; :mod:`hmqsearch.config_check` applies
them to Hydra's configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Union

from hmqsearch.errors import UserError

RULE = "allowed"  # the metadata key of a field's rule
MISSING = "???"  # OmegaConf's mark of a value that must be given
Real = Union[int, float]  # a number kept as written: 8 stays 8 (OmegaConf's float would make it 8.0)


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if _is_list(value) else value

class Rule:
    """What a setting allows: :meth:`accepts` a value, :meth:`describe` the allowed ones."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def complaint(self, key: str, value: Any) -> str:
        return f"{key}={_plain(value)!r}; allowed: {self.describe()}"


@dataclass(frozen=True)
class Number(Rule):
    """A number (or an integer) between ``low`` and ``high``; open bounds exclude the end."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low == 0 and self.low_open and self.high is None and not self.integer:
            text = "a positive number"
        elif self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_bound(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_bound(self.high)}"
        else:
            text = f"a finite {'integer' if self.integer else 'number'}"
        return text + (", or null" if self.nullable else "")


@dataclass(frozen=True)
class OneOf(Rule):
    """One of a few names."""

    choices: tuple[str, ...]

    def accepts(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return ", ".join(self.choices)


@dataclass(frozen=True)
class Each(Rule):
    """A list whose every entry the rule ``entry`` accepts."""

    entry: Rule

    def accepts(self, value: Any) -> bool:
        return _is_list(value) and all(self.entry.accepts(v) for v in value)

    def describe(self) -> str:
        return f"a list of {self.entry.describe()}"

    def complaint(self, key: str, value: Any) -> str:
        return f"{key}={_plain(value)!r}; allowed entries: {self.entry.describe()}"


POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
COUNT = Number(integer=True, low=0)
AT_LEAST_ONE = Number(integer=True, low=1)
BUDGET = Number(low=0, low_open=True, nullable=True)
FRACTION_OPEN = Number(low=0, high=1, low_open=True, high_open=True)


def setting(default: Any = MISSING, rule: Rule | None = None) -> Any:
    """A dataclass field with ``default`` (copied for each instance when it is a list or a dict)
    and the ``rule`` its values must follow."""
    metadata = {RULE: rule} if rule else {}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _schema_of(hint: Any) -> type | None:
    """The dataclass a type hint names, through ``Optional``."""
    if dataclasses.is_dataclass(hint):
        return hint
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else []
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


def fields_of(schema: type, prefix: str = "") -> Iterator[tuple[str, Any, Rule | None]]:
    """(dotted key, type hint, rule) of every setting of ``schema``, nested schemas walked."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        nested = _schema_of(hints[f.name])
        if nested is not None:
            yield from fields_of(nested, key)
        else:
            yield key, hints[f.name], f.metadata.get(RULE)


def nested_schema(schema: type, key: str) -> type | None:
    """The dataclass of the setting ``key`` of ``schema`` when it is a group of settings."""
    for name in key.split("."):
        if not dataclasses.is_dataclass(schema) or name not in {f.name for f in dataclasses.fields(schema)}:
            return None
        schema = _schema_of(typing.get_type_hints(schema)[name])
    return schema


def rules_of(schema: type, prefix: str = "") -> dict[str, Rule]:
    """The rule of every setting of ``schema`` that has one, by dotted key."""
    return {key: rule for key, _, rule in fields_of(schema, prefix) if rule is not None}


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every scalar in a plain container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            yield from _leaves(value, path)
        else:
            yield path, value


_ABSENT = object()


def _select(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def check_mapping(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise a :class:`UserError` for the first non-finite number in ``values`` (a plain nested
    mapping) or the first value a rule refuses (a key ``values`` does not have is skipped:
    another data module's setting)."""
    for key, value in _leaves(values):
        if isinstance(value, float) and not math.isfinite(value):
            allowed = rules[key].describe() if key in rules else "a finite number"
            raise UserError(f"{key}={value}; allowed: {allowed}")
    for key, rule in rules.items():
        value = _select(values, key)
        if value is not _ABSENT and not rule.accepts(value):
            raise UserError(rule.complaint(key, value))


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "true or false values", int: "integers", float: "numbers", str: "strings"}


def check_fields(obj: Any, prefix: str) -> None:
    """Check a dataclass instance against its fields' rules; ``prefix`` names it in the messages
    (``budget``, ``search.ramp``)."""
    node: Any = dataclasses.asdict(obj)
    for part in reversed(prefix.split(".")):
        node = {part: node}
    check_mapping(node, rules_of(type(obj), prefix))


def describe_type(hint: Any) -> str:
    """A type hint in words: ``Optional[int]`` is "an integer, or null"."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union:
        rest = [a for a in args if a is not type(None)]
        text = "a number" if set(rest) == {int, float} else " or ".join(describe_type(a) for a in rest)
        return text + (", or null" if type(None) in args else "")
    if typing.get_origin(hint) is list:
        return f"a list of {_PLURALS.get(args[0], 'values')}" if args else "a list"
    return _WORDS.get(hint, "a value of another kind")
