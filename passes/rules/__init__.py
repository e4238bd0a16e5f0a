"""The rule table: one factor map per primitive (see core.py)."""

from autoshard.passes.rules import contraction, control, conv, elementwise, structural  # noqa: F401
from autoshard.passes.rules.core import (
    FIXED,
    PASS,
    REDUCE,
    RULES,
    Factor,
    FactorMap,
    OpView,
    factor_map,
    has_rule,
    register,
    replicated_rule,
)

__all__ = [
    "FIXED",
    "PASS",
    "REDUCE",
    "RULES",
    "Factor",
    "FactorMap",
    "OpView",
    "factor_map",
    "has_rule",
    "register",
    "replicated_rule",
]
