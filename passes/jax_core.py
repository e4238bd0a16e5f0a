"""The one place that touches jax internals (jaxpr types, binding primitives).

JAX moves these types between releases; everything else in autoshard imports
them from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import dtypes as jdt
from jax.extend import core as jex

ClosedJaxpr = jex.ClosedJaxpr
Jaxpr = jex.Jaxpr
JaxprEqn = jex.JaxprEqn
Literal = jex.Literal
Primitive = jex.Primitive
Var = jex.Var
jaxprs_in_params = jex.jaxprs_in_params

# Call-like primitives whose body is evaluated once, in place: inlined by the graph pass.
# Maps the primitive name to the param that holds the body.
INLINE_BODY_PARAM = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


def split_closed(jaxpr: Any) -> tuple[Jaxpr, list[Any]]:
    """(jaxpr, consts) of a ClosedJaxpr or a bare Jaxpr (no consts)."""
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def is_literal(atom: Any) -> bool:
    return isinstance(atom, Literal)


def is_dropvar(var: Any) -> bool:
    return type(var).__name__ == "DropVar"


def eval_jaxpr(closed: ClosedJaxpr, *args: Any) -> list[Any]:
    """Evaluate a closed jaxpr on arguments (under any active trace)."""
    import jax

    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def bind(primitive: Primitive, invals: list[Any], params: dict[str, Any]) -> list[Any]:
    """Apply a primitive to values; always returns a list of outputs."""
    bind_params = primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
        subfuns, bind_params = bind_params
        out = primitive.bind(*subfuns, *invals, **bind_params)
    else:
        out = primitive.bind(*invals, **bind_params)
    return list(out) if primitive.multiple_results else [out]


def is_key_dtype(dtype: Any) -> bool:
    """A typed PRNG key dtype (`key<fry>`): numpy cannot interpret it."""
    return jdt.issubdtype(dtype, jdt.prng_key)


def value_dtype(dtype: Any) -> Any:
    """A numpy dtype, or the jax key dtype itself (it has `itemsize` and `str`)."""
    try:
        return _VALUE_DTYPES[dtype]  # every value of a step asks: a few dtypes in all
    except KeyError:
        out = _VALUE_DTYPES[dtype] = dtype if is_key_dtype(dtype) else np.dtype(dtype)
        return out
    except TypeError:  # unhashable
        return dtype if is_key_dtype(dtype) else np.dtype(dtype)


_VALUE_DTYPES: dict = {}
