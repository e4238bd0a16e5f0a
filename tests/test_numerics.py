"""A planned step equals the single-device step (fp32, highest matmul precision)."""

import optax
import pytest
from util import ADAM_ATOL, assert_close, run_both

from autoshard.models import gpt, mlp

MESHES = [(8,), (2, 4), (2, 2, 2), None]


@pytest.fixture(scope="module")
def mlp_setup():
    return mlp.setup(mlp.tiny(), batch_size=16)


@pytest.fixture(scope="module")
def gpt_setup():
    return gpt.setup(gpt.tiny(), batch_size=8)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_mlp_adamw_matches_single_device(mlp_setup, mesh):
    s = mlp_setup
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-6)  # loss
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_gpt_adamw_matches_single_device(gpt_setup, mesh):
    s = gpt_setup
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-5)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


@pytest.mark.parametrize(
    "model,mesh",
    [(mlp, (8,)), (mlp, (2, 4)), (gpt, (8,)), (gpt, (2, 4))],
    ids=lambda x: getattr(x, "__name__", str(x)).split(".")[-1],
)
def test_sgd_step_matches_exactly(model, mesh):
    """With SGD the update is lr * gradient: checks every gradient tightly."""
    s = model.setup(model.tiny(), batch_size=8, tx=optax.sgd(0.1))
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out, ref, atol=2e-6)


def test_wide_megatron_and_data_parallel_numerics():
    for cfg, batch in ((mlp.MLPConfig(64, 2048, 2), 8), (mlp.MLPConfig(32, 64, 2), 4096)):
        s = mlp.setup(cfg, batch_size=batch, tx=optax.sgd(0.1))
        out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=(8,))
        assert_close(out, ref, atol=2e-6)
