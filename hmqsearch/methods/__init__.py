"""The methods of the run, behind one interface (:class:`Method`), selected with ``_target_``
in ``conf/method/``: the HMQ search, uniform QAT, PTQ, the data-free SPIQ, and an earlier run's
bit-widths trained again (``assigned``)."""

from __future__ import annotations

from typing import Any

from hmqsearch.errors import UserError
from hmqsearch.methods.assigned import Assigned
from hmqsearch.methods.base import Method, Precision, Prepared
from hmqsearch.methods.fixed import PTQ, UniformQAT, assign_fixed
from hmqsearch.methods.hmq import HMQSearch
from hmqsearch.methods.spiq import SPIQ

METHODS: dict[str, type[Method]] = {m.name: m for m in (HMQSearch, UniformQAT, PTQ, SPIQ, Assigned)}

__all__ = ["Assigned", "HMQSearch", "METHODS", "Method", "PTQ", "Precision", "Prepared", "SPIQ", "UniformQAT", "assign_fixed",
           "by_name"]


def by_name(name: str, **options: Any) -> Method:
    """The method called ``name`` (a run directory's config written before ``_target_``)."""
    if name not in METHODS:
        raise UserError(f"method={name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name](**options)
