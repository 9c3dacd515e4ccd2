"""Hydra's configuration checked against the rules of :mod:`hmqsearch.settings`.

OmegaConf checks the types when Hydra composes (it refuses ``search.epochs=two``);
:func:`type_error_message` words that refusal like the rules' own, and :func:`check_values`
checks what types cannot say: ranges, choices, and finite numbers.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ValidationError

from hmqsearch.settings import Rule, check_mapping, describe_type, fields_of, nested_schema


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_values(cfg: DictConfig | Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """:func:`hmqsearch.settings.check_mapping` on a configuration, interpolations resolved."""
    container = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    check_mapping(OmegaConf.to_container(container, resolve=True), rules)


def type_error_message(error: ValidationError, schema: type) -> str:
    """OmegaConf's refusal of a value of the wrong type, as ``key=value; allowed: ...`` with the
    setting's rule, or its type in words where it has no rule."""
    key = str(error.full_key)
    field_key = re.sub(r"\[\d+\]$", "", key)
    found = {k: (hint, rule) for k, hint, rule in fields_of(schema)}
    hint, rule = found.get(field_key, (None, None))
    if rule is not None and field_key == key:
        return rule.complaint(key, error.value)
    nested = nested_schema(schema, key)
    if nested is not None:
        return f"{key}={_plain(error.value)!r}; allowed: its settings ({', '.join(f.name for f in dataclasses.fields(nested))})"
    if hint is not None:
        if field_key != key:  # one entry of a list
            lists = [h for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is list]
            hint = typing.get_args(lists[0])[0] if lists and typing.get_args(lists[0]) else Any
        return f"{key}={_plain(error.value)!r}; allowed: {describe_type(hint)}"
    return f"{key}={_plain(error.value)!r}: {str(error.msg).splitlines()[0]}"
