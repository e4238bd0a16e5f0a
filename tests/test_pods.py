"""Planning for hardware this process does not have: abstract meshes and device counts,
hierarchical interconnects (levels), and the spec-sheet presets."""

import doctest
import inspect

import jax
import pytest
from util import CPU

import autoshard
from autoshard.cost_model import hardware
from autoshard.cost_model.hardware import PRESETS, Hardware, Level
from autoshard.models import gpt_scan, mlp
from autoshard.models.common import abstract_setup
from autoshard.plan import Plan


@pytest.fixture(scope="module")
def scanned():
    s = abstract_setup(gpt_scan.setup, gpt_scan.tiny(), 64)
    return s, (s.state, s.batch)


@pytest.fixture(scope="module")
def pod_step(scanned):
    s, args = scanned
    mesh = jax.sharding.AbstractMesh((16, 16), ("data", "model"))
    return autoshard.parallelize(s.train_step, mesh=mesh, hardware=CPU), args


def test_plan_on_an_abstract_16x16_mesh(pod_step, tmp_path):
    step, args = pod_step
    plan = step.plan(*args)
    assert isinstance(plan.mesh, jax.sharding.AbstractMesh)
    assert dict(plan.mesh.shape) == {"data": 16, "model": 16}
    # the batch is split (64 sequences over 256 devices: one axis of 16 at least)
    assert plan.inputs[-1].path == "batch['tokens']" and plan.inputs[-1].spec[0]
    assert "[256 devices, abstract]" in plan.summary()
    plan.save(tmp_path / "plan.json")
    back = Plan.load(tmp_path / "plan.json")
    assert isinstance(back.mesh, jax.sharding.AbstractMesh) and back.mesh.axis_sizes == (16, 16)
    assert [e.spec for e in back.inputs] == [e.spec for e in plan.inputs]


def test_calling_or_lowering_an_abstract_plan_says_why(pod_step):
    step, args = pod_step
    for run in (step, step.lower):
        with pytest.raises(RuntimeError, match="abstract mesh .* this process does not have"):
            run(*args)


def test_devices_count_searches_abstract_meshes(scanned):
    s, args = scanned
    hw = CPU.with_(bandwidth=(5e9, 5e9), name="cpu, 2-D")  # 2-D meshes only: a fast search
    plan = autoshard.parallelize(s.train_step, devices=64, hardware=hw).plan(*args)
    assert isinstance(plan.mesh, jax.sharding.AbstractMesh) and plan.mesh.size == 64
    # the 2-D shapes are searched; a shape whose lower bound cannot beat the best plan
    # found is skipped (not a candidate)
    shapes = {"(2, 32)", "(4, 16)", "(8, 8)", "(16, 4)", "(32, 2)"}
    assert "(2, 32)" in plan.solver.candidates and set(plan.solver.candidates) <= shapes
    assert str(tuple(plan.mesh.axis_sizes)) in plan.solver.candidates
    assert plan.inputs[-1].spec[0]  # the batch is split


def test_abstract_targets_need_hardware_and_agreeing_sizes():
    s = abstract_setup(mlp.setup, mlp.tiny(), 16)
    with pytest.raises(ValueError, match="needs the hardware"):
        autoshard.parallelize(s.train_step, devices=256)
    mesh = jax.sharding.AbstractMesh((4, 4), ("a", "b"))
    with pytest.raises(ValueError, match="AbstractMesh"):
        autoshard.parallelize(s.train_step, mesh=mesh, devices=8, hardware=CPU).plan(
            s.state, s.batch
        )


NODE = Hardware(
    flops=5e10,
    bandwidth=5e9,
    memory_bandwidth=2e10,
    reduce_scatter=False,
    levels=(Level("in-node", 4, 5e10, 5e-6), Level("between nodes", None, 5e9, 2e-5)),
)


def test_levels_map_major_axes_across_nodes():
    assert [lv.name for lv in NODE.axis_levels((2, 4))] == ["between nodes", "in-node"]
    assert [lv.name for lv in NODE.axis_levels((4, 2))] == ["between nodes", "in-node"]
    assert [lv.name for lv in NODE.axis_levels((8,))] == ["between nodes"]
    assert [lv.name for lv in NODE.axis_levels((2, 2, 2))] == ["between nodes"] + ["in-node"] * 2
    assert NODE.for_mesh((2, 4)).bandwidth == (5e9, 5e10)
    # axes on the same level are interchangeable: (2, 2, 2) and its relabellings are one
    shapes = [m.axis_sizes for m in autoshard.mesh.candidate_meshes(None, 8, NODE)]
    assert (2, 4) in shapes and (4, 2) in shapes and shapes.count((2, 2, 2)) == 1


def test_the_slow_axis_carries_only_the_gradient_all_reduce():
    """Devices 0-3 and 4-7 are two nodes: on a (2, 4) mesh the first axis crosses them.
    Activations move inside a node; across nodes only gradients are all-reduced."""
    s = mlp.setup(mlp.MLPConfig(256, 1024, 2), 4096)
    step = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=NODE)
    cs = autoshard.parse_collectives(step.lower(s.state, s.batch).compile().as_text())
    crossing = [c for c in cs if any(min(g) < 4 <= max(g) for g in c.groups)]
    inside = [c for c in cs if c not in crossing]
    assert inside and crossing
    assert {c.kind for c in crossing} == {"all-reduce"}
    # the largest crossing all-reduce is the fused gradient: a quarter of the weights
    weights = sum(x.size * 4 for x in jax.tree.leaves(s.state.params))
    assert max(c.bytes for c in crossing) == pytest.approx(weights / 4, rel=0.05)


@pytest.mark.parametrize("module", [autoshard.mesh, hardware], ids=["mesh", "hardware"])
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


ACCELERATORS = ["tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "a100", "h100", "h200", "b200"]


@pytest.mark.parametrize("name", ACCELERATORS)
def test_presets_are_sane_and_cite_a_source(name):
    hw = PRESETS[name]
    assert hw.name == name
    assert 1e14 < hw.flops < 1e16 and 15e9 < hw.memory < 250e9
    assert hw.memory_bandwidth > hw.levels[0].bandwidth > 0
    speeds = [lv.bandwidth for lv in hw.levels]
    assert speeds == sorted(speeds, reverse=True) and hw.levels[-1].devices is None
    assert all(lv.latency > 0 for lv in hw.levels)
    # the comment block right above the preset's definition names its source
    lines = inspect.getsource(hardware).splitlines()
    at = next(
        i for i, line in enumerate(lines) if line.startswith(f"_{name.upper()}".replace("-", "_"))
    )
    comment = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        comment.append(line)
    assert any("https://" in line for line in comment), name
