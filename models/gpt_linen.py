"""The GPT of :mod:`autoshard.models.gpt`, written in Flax Linen.

Same architecture and :class:`~autoshard.models.gpt.GPTConfig`: token and
position embeddings, pre-LayerNorm blocks (causal multi-head attention through
separate ``q``/``k``/``v``/``o`` ``nn.Dense`` layers and ``jnp.einsum``, then a
GELU MLP), a final LayerNorm and an untied head. Linen keeps parameters outside
the module, so the train step is the plain ``init``/``apply`` + optax habit:
``TrainState.params`` is the Linen params dict (``{"block_0": {"attn": {"q":
{"kernel": ...}}}, ...}``) and ``model_state`` is ``None``.

Initial values differ from the NNX model (other random streams), so losses
match it only in distribution, not number for number.
"""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from autoshard.models import gpt
from autoshard.models.common import Batch, Setup, TrainState, TrainStep, apply_gradients
from autoshard.models.gpt import GPTConfig, synthetic_batch

__all__ = ["GPT", "GPTConfig", "loss_fn", "make_train_step", "setup", "synthetic_batch", "tiny"]


def tiny() -> GPTConfig:
    """The CPU-test config of :func:`autoshard.models.gpt.tiny`.

    Example:
      >>> tiny() == gpt.tiny()
      True
    """
    return gpt.tiny()


class Attention(nn.Module):
    """Causal multi-head self-attention on ``[B, T, d_model]``."""

    config: GPTConfig

    def _heads(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        return x.reshape(b, t, self.config.n_heads, d // self.config.n_heads)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.config.d_model
        if d % self.config.n_heads:
            raise ValueError(f"d_model {d} not divisible by n_heads {self.config.n_heads}")
        q = self._heads(nn.Dense(d, name="q")(x))
        k = self._heads(nn.Dense(d, name="k")(x))
        v = self._heads(nn.Dense(d, name="v")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return nn.Dense(d, name="o")(out.reshape(x.shape))


class FeedForward(nn.Module):
    """``w2(gelu(w1(x)))``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(nn.Dense(self.config.d_ff, name="w1")(x))
        return nn.Dense(self.config.d_model, name="w2")(h)


class Block(nn.Module):
    """Pre-LayerNorm decoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.config, name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + FeedForward(self.config, name="mlp")(nn.LayerNorm(name="ln2")(x))


class GPT(nn.Module):
    """Decoder mapping int tokens ``[B, T]`` (``T <= seq_len``) to logits ``[B, T, vocab]``.

    Example:
      >>> model = GPT(tiny())
      >>> tokens = jnp.zeros((2, 16), jnp.int32)
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> params["block_1"]["attn"]["q"]["kernel"].shape
      (64, 64)
      >>> model.apply({"params": params}, tokens).shape
      (2, 16, 128)
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab, cfg.d_model, name="tok_embed")(tokens)
        x = x + nn.Embed(cfg.seq_len, cfg.d_model, name="pos_embed")(jnp.arange(tokens.shape[1]))
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(cfg.vocab, name="head")(x)


def loss_fn(model: GPT, params: dict, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy of ``model`` with ``params`` on ``batch["tokens"]``.

    Example:
      >>> cfg = tiny()
      >>> batch = synthetic_batch(cfg, 2, jax.random.key(0))
      >>> params = GPT(cfg).init(jax.random.key(1), batch["tokens"][:, :-1])["params"]
      >>> loss_fn(GPT(cfg), params, batch).shape
      ()
    """
    tokens = batch["tokens"]
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_train_step(model: GPT, tx: optax.GradientTransformation) -> TrainStep:
    """A pure step ``(state, batch) -> (new_state, {"loss": loss})`` for Linen params.

    Example:
      >>> cfg, tx = tiny(), optax.sgd(0.1)
      >>> batch = synthetic_batch(cfg, 2, jax.random.key(0))
      >>> params = GPT(cfg).init(jax.random.key(1), batch["tokens"][:, :-1])["params"]
      >>> state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
      >>> state, metrics = jax.jit(make_train_step(GPT(cfg), tx))(state, batch)
      >>> int(state.step), metrics["loss"].shape
      (1, ())
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch))(state.params)
        return apply_gradients(state, grads, tx), {"loss": loss}

    return train_step


def setup(
    config: GPTConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3, tx=None
) -> Setup:
    """A Linen GPT, its train step (``tx``, default ``optax.adamw(learning_rate)``),
    initial state and one synthetic batch.

    Example:
      >>> s = setup(tiny(), batch_size=2)
      >>> state, metrics = jax.jit(s.train_step)(s.state, s.batch)
      >>> int(state.step), state.model_state is None
      (1, True)
    """
    tx = optax.adamw(learning_rate) if tx is None else tx
    model_key, data_key = jax.random.split(jax.random.key(seed))
    model = GPT(config)
    batch = synthetic_batch(config, batch_size, data_key)
    params = jax.jit(model.init)(model_key, batch["tokens"][:, :-1])["params"]
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), None)
    return Setup(make_train_step(model, tx), state, batch, config)
