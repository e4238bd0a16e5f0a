"""A stack of MLP blocks trained by regression: the simplest reference model.

Each block is ``Linear(d_model, d_hidden) -> gelu -> Linear(d_hidden, d_model)``
with biases and no residual, so a Megatron plan (``w1`` split by columns,
``w2`` by rows) applies block by block. Parameter paths read
``params["blocks"][i]["w1"]["kernel"]``.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from autoshard.models.common import Batch, Setup, setup_model


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Sizes of the MLP.

    Attributes:
      d_model: width of the input, output and block boundaries.
      d_hidden: width inside each block.
      n_blocks: number of blocks.
    """

    d_model: int = 256
    d_hidden: int = 1024
    n_blocks: int = 2


def tiny() -> MLPConfig:
    """A config small enough for CPU tests.

    Example:
      >>> tiny().d_model
      32
    """
    return MLPConfig(d_model=32, d_hidden=64, n_blocks=2)


class Block(nnx.Module):
    """``w2(gelu(w1(x)))``."""

    def __init__(self, config: MLPConfig, rngs: nnx.Rngs):
        self.w1 = nnx.Linear(config.d_model, config.d_hidden, rngs=rngs)
        self.w2 = nnx.Linear(config.d_hidden, config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.gelu(self.w1(x)))


class MLP(nnx.Module):
    """``n_blocks`` blocks applied in sequence to ``[B, d_model]`` inputs.

    Example:
      >>> model = MLP(tiny(), nnx.Rngs(0))
      >>> model(jnp.ones((4, 32))).shape
      (4, 32)
    """

    def __init__(self, config: MLPConfig, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_blocks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


def loss_fn(model: MLP, batch: Batch) -> jax.Array:
    """Mean squared error of ``model(batch["x"])`` against ``batch["y"]``.

    Example:
      >>> cfg = tiny()
      >>> loss_fn(MLP(cfg, nnx.Rngs(0)), synthetic_batch(cfg, 4, jax.random.key(0))).shape
      ()
    """
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def synthetic_batch(config: MLPConfig, batch_size: int, key: jax.Array) -> Batch:
    """Random inputs ``x`` and a learnable target ``y = tanh(x @ A)`` (both f32).

    Returns:
      ``{"x": [batch_size, d_model], "y": [batch_size, d_model]}``.

    Example:
      >>> b = synthetic_batch(tiny(), 8, jax.random.key(0))
      >>> b["x"].shape, b["y"].dtype
      ((8, 32), dtype('float32'))
    """
    kx, ka = jax.random.split(key)
    x = jax.random.normal(kx, (batch_size, config.d_model), jnp.float32)
    a = jax.random.normal(ka, (config.d_model, config.d_model), jnp.float32)
    return {"x": x, "y": jnp.tanh(x @ a / jnp.sqrt(config.d_model))}


def setup(
    config: MLPConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3, tx=None
) -> Setup:
    """An MLP, its adamw train step, initial state and one synthetic batch.

    Example:
      >>> s = setup(tiny(), batch_size=8)
      >>> state, metrics = jax.jit(s.train_step)(s.state, s.batch)
      >>> int(state.step)
      1
    """
    return setup_model(MLP, loss_fn, synthetic_batch, config, batch_size, seed, learning_rate, tx)
