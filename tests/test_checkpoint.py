"""Save a sharded train state under one plan, restore it under others with orbax."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from util import ADAM_ATOL, assert_close

import autoshard
from autoshard import checkpoint
from autoshard.models import mlp

KERNEL = "state.params['blocks'][0]['w1']['kernel'].value"


def _spec(plan, path):
    return next(e.spec for e in plan.inputs if e.path == path)


def test_restore_under_other_meshes_and_device_counts(tmp_path):
    s = mlp.setup(mlp.MLPConfig(64, 2048, 2), batch_size=8)
    saved_step = autoshard.parallelize(s.train_step, mesh=(8,))
    assert _spec(saved_step.plan(s.state, s.batch), KERNEL) != P(), "plan should split w1"
    state, _ = saved_step(s.state, s.batch)
    checkpoint.save(tmp_path / "ckpt", state)
    expected = jax.jit(s.train_step)(state, s.batch)  # one device, from the saved state

    for kwargs in ({"mesh": (2, 4)}, {"devices": jax.devices()[:4]}):
        step = autoshard.parallelize(s.train_step, **kwargs)
        plan = step.plan(s.state, s.batch)
        restored = checkpoint.restore(tmp_path / "ckpt", plan)
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        target = jax.tree.leaves(checkpoint.restore_target(plan))
        leaves = zip(jax.tree.leaves(restored), target, jax.tree.leaves(state), strict=True)
        for got, want, saved in leaves:
            assert got.sharding == want.sharding and got.shape == want.shape
            np.testing.assert_array_equal(np.asarray(got), np.asarray(saved))
        kernel = next(
            a
            for p, a in jax.tree_util.tree_flatten_with_path(restored)[0]
            if jax.tree_util.keystr(p, simple=False) == KERNEL[len("state") :]
        )
        assert len(kernel.sharding.device_set) == plan.mesh.devices.size
        assert kernel.sharding.spec == _spec(plan, KERNEL) != P()
        assert_close(step(restored, s.batch), expected, atol=ADAM_ATOL)


def test_restore_target_needs_a_live_plan(tmp_path):
    s = mlp.setup(mlp.tiny(), batch_size=8)
    plan = autoshard.parallelize(s.train_step, mesh=(8,)).plan(s.state, s.batch)
    plan.save(str(tmp_path / "plan.json"))
    try:
        checkpoint.restore_target(autoshard.Plan.load(str(tmp_path / "plan.json")))
    except ValueError as e:
        assert "plan the step again" in str(e)
    else:
        raise AssertionError("a loaded plan has no argument structure")
