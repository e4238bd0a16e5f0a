"""The benchmark's scoring, on tiny models through the code the real sizes take."""

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines  # noqa: E402
import compare  # noqa: E402
import measure  # noqa: E402
import pods  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402

import autoshard  # noqa: E402

OPTS = compare.parse_args(["--tiny", "--time-limit", "20"])


def _mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def test_a_scanned_layer_counts_once_per_layer():
    """A layer loop's matmuls and collectives count once per iteration, so a scan of
    4 layers scores as its unrolled twin (cost_analysis counts the body once)."""
    mesh = _mesh()
    w_sh = NamedSharding(mesh, P(None, None, "x"))

    def scanned(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi) @ wi.T, None), x, w)[0].sum()

    def unrolled(w, x):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i]) @ w[i].T
        return x.sum()

    args = (jax.ShapeDtypeStruct((4, 32, 64), jnp.float32), jax.ShapeDtypeStruct((16, 32), "f4"))
    hw = autoshard.PRESETS["h100"]
    got = {}
    for name, f in (("scan", scanned), ("unrolled", unrolled)):
        jitted = jax.jit(f, in_shardings=(w_sh, NamedSharding(mesh, P())))
        got[name] = measure.measure(jitted, args, hw)
    assert got["scan"].loops_known
    assert got["scan"].flops == got["unrolled"].flops == 4 * 2 * (2 * 16 * 32 * 8)
    ar = {k: v.count for k, v in got["scan"].collectives.items()}
    assert ar == {"all-reduce": 4}, got["scan"].collectives


def test_only_a_hand_plan_that_fits_is_the_best(tmp_path):
    """With device memory between FSDP's and data parallel's footprint, data parallel
    is marked as not fitting and FSDP is the best hand plan, although data parallel
    is faster; autoshard's ratio is taken against FSDP."""
    w = workloads.TINY[0]
    s = w.setup()
    plans = {p.name: p for p in baselines.hand_plans(8, [], w.heads, w.kv_heads)}
    hw = autoshard.PRESETS["h100"]
    dp = compare.run_hand(w, plans[baselines.DP], s, False, hw)
    fsdp = compare.run_hand(w, plans[baselines.FSDP], s, False, hw)
    assert dp.ok and fsdp.ok and fsdp.memory < dp.memory and dp.est < fsdp.est
    small = hw.with_(memory=(dp.memory + fsdp.memory) / 2)
    dp, fsdp = (dataclasses.replace(r, capacity=small.memory) for r in (dp, fsdp))
    auto = compare.run_autoshard(w, (8,), s, small, OPTS, [])
    assert auto.ok, auto.error
    rows = [dp, fsdp, auto]
    assert report.best_hand(rows)[(w.name, "8")] is fsdp
    assert report.fit_text(dp).startswith("does not fit: ")
    assert math.isclose(report.ratio(auto, report.best_hand(rows)), auto.est / fsdp.est)
    assert auto.memory <= small.memory  # autoshard planned within the smaller device
    text = report.render(rows, small, OPTS, 1.0)
    assert "does not fit" in text and "| tiny GPT | 8 | FSDP (ZeRO-3) (8,) |" in text
    report.plot(rows, str(tmp_path / "ratios.png"))
    assert (tmp_path / "ratios.png").stat().st_size > 0


def test_megatron_and_maxtext_rules_split_by_logical_names():
    """Hand-plan rules read logical names off paths, stacked layers included, and
    never cut a head."""
    q = ".params['blocks']['attn']['q']['kernel'].value"
    rule = baselines.named_rule(baselines.MAXTEXT_RULES, {"fsdp": 2, "tensor": 4}, 4, 2)
    assert rule(q, (2, 64, 64)) == P(None, "fsdp", "tensor")
    k = ".opt_state[0].mu['blocks']['attn']['k']['kernel'].value"
    assert rule(k, (2, 64, 32)) == P(None, "fsdp", None)  # 2 kv heads over 4: whole
    mega = baselines.named_rule({"mlp": "x"}, {"x": 8}, 4, 4)
    assert mega(".params['blocks']['mlp']['w2']['kernel'].value", (2, 256, 64)) == P(
        None, "x", None
    )


@pytest.mark.parametrize("method", [baselines.FSDP])
def test_a_pinned_hand_plan_on_an_abstract_pod(method):
    """On 64 abstract devices a hand plan pins the state; the pinned layout holds in the
    plan and shrinks the predicted memory below data parallel's."""
    w = workloads.TINY[0]
    t = pods.TARGETS[0]
    s = w.setup(devices=t.devices)
    plans = {p.name: p for p in baselines.hand_plans(64, [(8, 8)], w.heads, w.kv_heads)}
    dp = pods.run_hand(w, t, plans[baselines.DP], s, False, OPTS)
    sharded = pods.run_hand(w, t, plans[method], s, False, OPTS)
    assert dp.ok and sharded.ok, (dp.error, sharded.error)
    assert sharded.memory < dp.memory
    assert sharded.capacity == t.hardware.memory


def test_a_residual_constraint_stays_with_its_own_plan():
    """A hand plan's residual-stream constraint is read while tracing; each plan traces
    a fresh step, so jax's trace cache cannot hand one plan's constraint to the next."""
    s = workloads.TINY[0].setup()
    sharding = NamedSharding(_mesh(), P("x"))

    def constraints(carry) -> int:
        with workloads.carry_sharding(carry):
            traced = jax.jit(workloads.fresh(s.train_step)).trace(s.state, s.batch)
        return str(traced.jaxpr).count("sharding_constraint")

    assert constraints(sharding) > 0
    assert constraints(None) == 0


@pytest.mark.parametrize("remat", [False, True])
def test_every_workload_family_traces(remat):
    """The tiny twins of the benchmark's models (the same classes) trace to a loss,
    so a change to a reference model's interface shows up here, not mid-benchmark."""
    for w in workloads.TINY:
        s = w.setup(remat=remat)
        _, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
        assert metrics["loss"].shape == (), w.name
