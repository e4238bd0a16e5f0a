"""One plan for every process of a multi-process job (`jax.distributed`).

Under `jax.distributed` every process runs the same decorated step over one global
mesh, and every process must run the same sharded program, or the collectives of
one wait forever for those of another. A plan found under a solver time limit
depends on the wall clock, so processes do not plan on their own: process 0 plans,
publishes the plan in the job's key-value store (the coordinator that
`jax.distributed.initialize` started), and every other process waits for it and
runs from it. Every process, process 0 included, builds its `Plan` from the same
published bytes.

What is published is the decision itself: the mesh (shape, axis names and the ids
of its devices in mesh order), the layout of every value and operand of the step's
graph, the input and output specs, and the predicted costs. The other processes
trace the step themselves (tracing is deterministic) and never solve. The key names
a digest of the traced graph, so a process that plans a different step than process
0 does not pick up a wrong plan: it times out with an error instead.

`AUTOSHARD_PLAN_TIMEOUT` (seconds, default `PLAN_TIMEOUT`) bounds how long a process
waits for process 0. If planning fails on process 0 (no plan fits the memory budget,
for instance), the error is published too and every process raises it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from collections.abc import Callable

import jax
import numpy as np

from autoshard.passes.annotate import Layout
from autoshard.passes.graph import Lit, OpGraph
from autoshard.plan import Plan
from autoshard.search import MemoryBudgetError

# Seconds a process waits for process 0's plan before giving up (planning a large
# step on several meshes can take many solver time limits).
PLAN_TIMEOUT = 1800.0
TIMEOUT_ENV = "AUTOSHARD_PLAN_TIMEOUT"
KEY_PREFIX = "autoshard/plan"

# Errors process 0 may hit while planning, raised again as the same class elsewhere.
_ERRORS = {e.__name__: e for e in (MemoryBudgetError, ValueError, TypeError)}
# How many plans this process has agreed on per leader and graph digest (the key's
# last part: the same step may be planned more than once, e.g. for two meshes).
_counts: dict[str, int] = {}


class PlanTimeoutError(RuntimeError):
    """The planning process did not publish the plan this process waits for in time."""


def agree(solve: Callable[[], Plan], graph: OpGraph, devices, graph_for=None) -> Plan:
    """The plan every process runs: `solve()` on one process, shared with the others.

    With one process, or devices all of this process, this is `solve()`. Otherwise
    the lowest-numbered process that owns devices of the step (process 0 when the step
    runs over all devices) solves and publishes the plan; the others wait for it (see
    the module docstring) and never call solve.

    Args:
      solve: plans the step on this process (called on the publishing process only).
      graph: the step's graph, the same on every process.
      devices: the devices the step is planned over.
      graph_for: given the plan's `RematChoice` (or None), the graph of the form of
        the step the plan runs (see `decode`); default: `graph`.

    Returns:
      The Plan, decoded from the published bytes on every process.

    Example:
      >>> plan = agree(lambda: plan_the_step(), graph, jax.devices())   # doctest: +SKIP
    """
    owners = {d.process_index for d in devices}
    if owners == {jax.process_index()}:
        return solve()  # nothing crosses processes: no other process runs this plan
    leader = min(owners)  # process 0 when the step runs over all devices
    client = _client()
    name = f"{KEY_PREFIX}/{leader}/{graph_digest(graph)}"
    n = _counts.get(name, 0)
    _counts[name] = n + 1
    key = f"{name}/{n}"
    if jax.process_index() == leader:
        try:
            data = encode(solve())
        except Exception as e:
            client.key_value_set_bytes(key, _encode_error(e))
            raise
        client.key_value_set_bytes(key, data)
    else:
        data = _wait(client, key, leader)
    return decode(data, graph, graph_for)


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            f"autoshard: jax sees {jax.process_count()} processes but jax.distributed has "
            "no client in this one: call jax.distributed.initialize() before the first step."
        )
    return client


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return PLAN_TIMEOUT
    try:
        return float(value)
    except ValueError:
        raise ValueError(
            f"autoshard: {TIMEOUT_ENV}={value!r} is not a number of seconds."
        ) from None


def _wait(client, key: str, leader: int) -> bytes:
    timeout = _timeout()
    try:
        data = client.blocking_key_value_get_bytes(key, int(timeout * 1000))
    except Exception as e:  # jaxlib raises its own error type for DEADLINE_EXCEEDED
        raise PlanTimeoutError(
            f"autoshard: process {jax.process_index()} waited {timeout:g} s for process {leader} "
            f"to publish the plan under '{key}' and got none ({type(e).__name__}: "
            f"{str(e)[:200]}). Every "
            "process must call the decorated step (or .plan/.lower) with the same arguments "
            f"in the same order; if process {leader} is still planning, raise "
            f"{TIMEOUT_ENV} (seconds) or lower time_limit."
        ) from e
    doc = json.loads(zlib.decompress(data))
    if "error" in doc:
        cls = _ERRORS.get(doc["error"], RuntimeError)
        raise cls(f"autoshard: planning failed on process {leader}: {doc['message']}")
    return data


def graph_digest(graph: OpGraph) -> str:
    """A digest of the traced step: its inputs, outputs and every operation with its
    operand and result shapes. Equal on every process that traced the same step.

    Example:
      >>> graph_digest(graph)   # doctest: +SKIP
      '3f2a...'
    """
    t = graph.traced
    parts = [
        [t.in_paths, [_aval(a) for a in t.in_avals]],
        [t.out_paths, [_aval(a) for a in t.out_avals]],
        [[list(v.shape), str(v.dtype)] for v in graph.values],
        [list(graph.inputs), [_ref(r) for r in graph.outputs]],
    ]
    for node in graph.nodes:
        name = getattr(node.primitive, "name", type(node.primitive).__name__)
        parts.append([name, [_ref(r) for r in node.inputs], list(node.outputs)])
    text = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _aval(a) -> list:
    return [list(a.shape), str(a.dtype)]


def _ref(r) -> object:
    return ["lit", list(r.shape)] if isinstance(r, Lit) else r


def encode(plan: Plan) -> bytes:
    """The plan as compressed JSON, with everything `decode` needs to rebuild it: the
    plan's own JSON document, the ids of the mesh's devices and the layout.

    Example:
      >>> decode(encode(plan), graph).in_specs == plan.in_specs   # doctest: +SKIP
      True
    """
    doc = plan.to_doc()
    doc["mesh"]["ids"] = [int(d.id) for d in plan.mesh.devices.flat]
    doc["layout"] = dataclasses.asdict(plan.layout)
    return zlib.compress(json.dumps(doc).encode())


def _encode_error(e: Exception) -> bytes:
    doc = {"error": type(e).__name__, "message": str(e)}
    return zlib.compress(json.dumps(doc).encode())


def decode(data: bytes, graph: OpGraph, graph_for=None) -> Plan:
    """The Plan that `encode` wrote, on this process's devices and traced step.

    Args:
      data: what `encode` wrote.
      graph: the step's graph as this process traced it.
      graph_for: given the plan's `RematChoice` (or None), the graph of the form of the
        step the plan runs (the layout describes that graph); default: `graph`.

    Example:
      >>> decode(encode(plan), graph).mesh.shape == plan.mesh.shape   # doctest: +SKIP
      True
    """
    doc = json.loads(zlib.decompress(data))
    plan = Plan.from_doc(doc, _mesh(doc["mesh"]))
    if graph_for is not None:
        graph = graph_for(plan.remat)
    traced = graph.traced
    layout = Layout(**{k: _tuples(v) for k, v in doc["layout"].items()})
    if len(layout.value_specs) != len(graph.values) or len(doc["inputs"]) != len(traced.in_avals):
        raise RuntimeError(
            "autoshard: the plan published by another process does not fit the step this process "
            "traced: every process must run the same step on arguments of the same shapes."
        )
    in_specs = jax.tree_util.tree_unflatten(traced.in_tree, plan.in_specs)
    out_specs = jax.tree_util.tree_unflatten(traced.out_tree, plan.out_specs)
    return dataclasses.replace(plan, in_specs=in_specs, out_specs=out_specs, layout=layout)


def _mesh(doc: dict) -> jax.sharding.Mesh:
    """The published mesh over this process's view of the same global devices."""
    by_id = {d.id: d for d in jax.devices()}
    missing = [i for i in doc["ids"] if i not in by_id]
    if missing:
        raise RuntimeError(
            f"autoshard: another process planned on devices {missing} that this process does not "
            "see in jax.devices(): every process must see the same global devices."
        )
    devices = np.array([by_id[i] for i in doc["ids"]], dtype=object).reshape(doc["shape"])
    names = tuple(doc["names"])
    types = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.sharding.Mesh(devices, names, axis_types=types)


def _tuples(x):
    """JSON lists back into the nested tuples they were."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
