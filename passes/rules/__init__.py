"""The rule table: one factor map per primitive (see core.py)."""

from autoshard.passes.rules import (  # noqa: F401
    contraction,
    control,
    conv,
    elementwise,
    random,
    structural,
)
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
