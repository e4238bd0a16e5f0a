"""A residual MLP stack written as `jax.lax.scan` over stacked layer weights.

``h <- h + gelu(h @ w1 + b1) @ w2 + b2`` for each of ``n_layers`` layers, with the
weights of all layers stacked on a leading layer dimension, then a mean-squared
error against a target. The reference model for pipeline parallelism: the forward
pass is one scan over the layers and its gradient one reverse scan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from autoshard.models.common import Setup


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Sizes of the stack.

    Attributes:
      d_model: width of the residual stream.
      d_hidden: width inside each layer.
      n_layers: number of layers (the scan's length).
    """

    d_model: int = 256
    d_hidden: int = 256
    n_layers: int = 8


def init_params(config: StackConfig, key: jax.Array) -> dict:
    """Stacked layer weights ``[n_layers, ...]`` (fan-in scaled normal, zero biases).

    Example:
      >>> init_params(StackConfig(8, 16, 4), jax.random.key(0))["w1"].shape
      (4, 8, 16)
    """
    k1, k2 = jax.random.split(key)
    n, d, h = config.n_layers, config.d_model, config.d_hidden
    return {
        "w1": jax.random.normal(k1, (n, d, h), jnp.float32) / jnp.sqrt(d),
        "b1": jnp.zeros((n, h), jnp.float32),
        "w2": jax.random.normal(k2, (n, h, d), jnp.float32) / jnp.sqrt(h) / n,
        "b2": jnp.zeros((n, d), jnp.float32),
    }


def forward(params: dict, x: jax.Array) -> jax.Array:
    """The stack applied to ``x [batch, d_model]`` by one `lax.scan` over the layers.

    Example:
      >>> p = init_params(StackConfig(8, 16, 4), jax.random.key(0))
      >>> forward(p, jnp.ones((2, 8))).shape
      (2, 8)
    """

    def layer(h, w):
        return h + jax.nn.gelu(h @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"], None

    return jax.lax.scan(layer, x, params)[0]


def setup(
    config: StackConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3
) -> Setup:
    """The stack, its adamw train step ``(state, batch) -> (state, {"loss"})``, an
    initial state ``(params, opt_state)`` and one batch ``{"x", "y"}``.

    Example:
      >>> s = setup(StackConfig(8, 16, 4), batch_size=4)
      >>> state, metrics = jax.jit(s.train_step)(s.state, s.batch)
      >>> metrics["loss"].shape
      ()
    """
    kp, kx, ka = jax.random.split(jax.random.key(seed), 3)
    tx = optax.adamw(learning_rate)
    params = init_params(config, kp)
    x = jax.random.normal(kx, (batch_size, config.d_model), jnp.float32)
    a = jax.random.normal(ka, (config.d_model, config.d_model), jnp.float32)
    batch = {"x": x, "y": jnp.tanh(x @ a / jnp.sqrt(config.d_model))}

    def train_step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((forward(p, batch["x"]) - batch["y"]) ** 2)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return Setup(train_step, (params, tx.init(params)), batch, config)
