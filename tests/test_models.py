"""Reference models: they train, they trace, and their state round-trips."""

import doctest

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from util import missing_rules, primitives, train

from autoshard.models import common, gpt, mlp

# (module, batch size, required last/first loss ratio after 20 adamw steps at 1e-3).
# Measured ratios: mlp ~0.46, gpt ~0.14.
CASES = [(mlp, 16, 0.7), (gpt, 8, 0.5)]
IDS = ["mlp", "gpt"]


def _avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.parametrize(("module", "batch_size", "ratio"), CASES, ids=IDS)
def test_loss_falls(module, batch_size, ratio):
    s = module.setup(module.tiny(), batch_size)
    state, losses = train(s)
    assert int(state.step) == 20
    assert losses[-1] < ratio * losses[0], losses


@pytest.mark.parametrize(("module", "batch_size", "ratio"), CASES, ids=IDS)
def test_jaxpr_and_state_roundtrip(module, batch_size, ratio):
    del ratio
    s = module.setup(module.tiny(), batch_size)
    jaxpr = jax.make_jaxpr(s.train_step)(s.state, s.batch)
    assert "dot_general" in {eqn.primitive.name for eqn in jaxpr.eqns}
    out_state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
    assert jax.tree.structure(out_state) == jax.tree.structure(s.state)
    assert _avals(out_state) == _avals(s.state)
    assert metrics["loss"].shape == ()
    assert s.state.step.dtype == jnp.int32


def test_param_paths_are_readable():
    s = mlp.setup(mlp.tiny(), 4)
    cfg = mlp.tiny()
    assert s.state.params["blocks"][0]["w1"]["kernel"].shape == (cfg.d_model, cfg.d_hidden)
    g = gpt.setup(gpt.tiny(), 2)
    assert g.state.params["blocks"][1]["attn"]["q"]["kernel"].shape == (64, 64)


def test_init_state_rejects_non_param_state():
    class WithDropout(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    with pytest.raises(ValueError, match="other than nnx.Param"):
        common.init_state(WithDropout(nnx.Rngs(0)), optax.sgd(0.1))


@pytest.mark.parametrize("module", [common, mlp, gpt], ids=["common", "mlp", "gpt"])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("module", [mlp, gpt], ids=["mlp", "gpt"])
def test_every_primitive_of_the_step_has_a_rule(module):
    s = module.setup(module.tiny(), 4)
    assert "dot_general" in primitives(s.train_step, s.state, s.batch)
    assert missing_rules(s.train_step, s.state, s.batch) == set()
