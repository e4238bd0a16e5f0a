"""Shared checks: a planned step against the single-device step, plans against HLO."""

from __future__ import annotations

import jax
import jax.monitoring
import numpy as np

import autoshard

# CPU-like numbers for plan tests; XLA's CPU backend does not form reduce-scatters.
CPU = autoshard.Hardware(
    flops=5e10, bandwidth=5e9, latency=2e-5, memory_bandwidth=2e10, reduce_scatter=False
)

# adamw normalises each update by sqrt(nu): where a gradient is ~0 its sign (and so a
# full +-lr step) can flip between equally correct reduction orders; see JAX_NOTES.
ADAM_ATOL = 1e-3


def train(setup, steps: int = 20):
    """(final state, losses) of `steps` jitted single-device steps on setup's batch."""
    step = jax.jit(setup.train_step)
    state, losses = setup.state, []
    for _ in range(steps):
        state, metrics = step(state, setup.batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def run_both(train_step, state, batch, **kwargs):
    """(sharded output, single-device output, the wrapped step)."""
    ref = jax.jit(train_step)(state, batch)
    step = autoshard.parallelize(train_step, **kwargs)
    out = step(state, batch)
    return out, ref, step


def assert_close(out, ref, atol, rtol=1e-5):
    flat_o, tree_o = jax.tree_util.tree_flatten_with_path(out)
    flat_r, tree_r = jax.tree_util.tree_flatten(ref)
    assert tree_o == tree_r
    for (path, a), b in zip(flat_o, flat_r, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path)
        )


def spec_of(plan, fragment: str):
    """The PartitionSpec of the one input whose path contains every fragment."""
    hits = [e for e in plan.inputs if fragment in e.path and "opt_state" not in e.path]
    assert len(hits) == 1, [e.path for e in hits]
    return tuple(hits[0].spec)


def compiled_vs_predicted(step, *args):
    """({kind: (count, bytes)} compiled, predicted) for a planned step."""
    compiled = autoshard.collectives(step.lower(*args).compile())
    return compiled, step.plan(*args).cost.collectives


def assert_prediction_matches(step, *args, rel=0.10):
    compiled, predicted = compiled_vs_predicted(step, *args)
    assert set(compiled) == set(predicted), (compiled, predicted)
    for kind, (n, b) in compiled.items():
        pn, pb = predicted[kind]
        assert pn == n, (kind, compiled, predicted)
        assert abs(pb - b) <= rel * b, (kind, compiled, predicted)


def primitives(train_step, *args) -> set[str]:
    """Every primitive in the step's jaxpr, loop and branch bodies included; call-like
    wrappers (jit, custom_jvp/vjp, remat) are inlined by the graph pass, so they are
    replaced by their bodies' primitives."""
    from autoshard.passes import jax_core

    names: set[str] = set()

    def walk(jaxpr):
        jaxpr, _ = jax_core.split_closed(jaxpr)
        for eqn in jaxpr.eqns:
            if eqn.primitive.name not in jax_core.INLINE_BODY_PARAM:
                names.add(eqn.primitive.name)
            for sub in jax_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(train_step)(*args))
    return names


def missing_rules(train_step, *args) -> set[str]:
    """Primitives of the step that would fall back to replication."""
    from autoshard.passes.rules import has_rule

    return {p for p in primitives(train_step, *args) if not has_rule(p)}


def split_values(plan) -> int:
    """How many values of the planned step (inputs, intermediates, outputs) are split
    over at least one mesh axis."""
    return sum(1 for spec in plan.layout.value_specs if spec and any(spec))


def assert_sharded(plan, what: str = "") -> int:
    """The plan really splits something: a numerics check on it can catch a sharding
    bug. `what`: a path fragment of an input that must itself be split."""
    n = split_values(plan)
    assert n > 0, "the plan splits nothing: choose shapes or hardware that split, or pin a mesh"
    if what:
        hits = [e for e in plan.inputs if what in e.path]
        assert hits and any(any(d is not None for d in e.spec) for e in hits), [
            (e.path, e.spec) for e in hits
        ]
    return n


def assert_replicated(plan) -> None:
    """The plan keeps every value whole: for tests of replication on purpose."""
    assert split_values(plan) == 0


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _on_event(name, _secs, **_kw):
    if name == BACKEND_COMPILE:
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compiles() -> int:
    """Backend compilations so far in this process (jax.monitoring's compile event)."""
    return _compiles[0]

def compiled_bytes(step, *args) -> int:
    """Per-device bytes of the step's compiled program (autoshard.compiled_memory)."""
    return autoshard.compiled_memory(step.lower(*args).compile())
