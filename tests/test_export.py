"""Exporting a plan as hand-written sharding: PartitionSpec source and logical-axis rules."""

import doctest

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P
from util import CPU

import autoshard
from autoshard import export
from autoshard.models import gpt_scan
from autoshard.models.common import abstract_setup
from autoshard.plan import Plan


@pytest.fixture(scope="module")
def plan():
    # a small batch on (2, 4): the plan splits heads and the MLP (tensor parallel)
    s = abstract_setup(gpt_scan.setup, gpt_scan.tiny(), 8)
    plan = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU).plan(s.state, s.batch)
    assert any(e.spec for e in plan.inputs if "['mlp']" in e.path), "the plan splits nothing"
    return plan


def _leaves(specs):
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


def test_partition_spec_source_round_trips(plan):
    ns: dict = {}
    exec(plan.export(), ns)
    assert list(ns["in_specs"].values()) == _leaves(plan.in_specs)
    assert list(ns["in_specs"]) == [e.path for e in plan.inputs]


def test_logical_rules_give_the_planned_specs(plan):
    ns: dict = {}
    exec(plan.export(rules=True), ns)
    rules, axes = ns["logical_axis_rules"], ns["logical_axes"]
    assert ns["exceptions"] == {}
    specs = {e.path: e.spec for e in plan.inputs}
    params = [p for p in axes if "params" in p]
    assert len(params) == sum("params" in e.path and "opt_state" not in e.path for e in plan.inputs)
    assert axes["state.params['blocks']['mlp']['w1']['kernel'].value"] == ("layers", "embed", "mlp")
    assert axes["state.params['blocks']['attn']['o']['kernel'].value"] == (
        "layers",
        "heads",
        "embed",
    )
    for path, names in axes.items():
        # flax's own rule engine turns the names into the plan's spec
        got = export._trim(nn.logical_to_mesh_axes(names, rules))
        assert got == export._trim(specs[path]), path
    assert dict(rules)["mlp"] is not None  # the rules carry the split


def test_rules_list_what_they_cannot_express(plan):
    # o's input dimension is "heads"; split it differently from q's and the rules
    # cannot give both: one of them is listed as an exception
    entries = list(plan.inputs)
    i = next(k for k, e in enumerate(entries) if e.path.endswith("['o']['kernel'].value"))
    q = next(e for e in entries if e.path.endswith("['q']['kernel'].value"))
    other = "x" if "y" in str(q.spec) else "y"
    entries[i] = entries[i].__class__(
        entries[i].path, entries[i].shape, entries[i].dtype, P(None, other, None)
    )
    changed = Plan(plan.mesh, plan.in_specs, plan.out_specs, plan.cost, plan.solver, tuple(entries))
    r = export.logical_rules(changed)
    assert r.exceptions and all("['attn']" in p for p in r.exceptions)


def test_export_of_a_saved_plan(plan, tmp_path):
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").export(rules=True) == plan.export(rules=True)


def test_docstring_examples_run():
    assert doctest.testmod(export).failed == 0
