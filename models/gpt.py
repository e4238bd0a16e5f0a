"""A GPT-2-style decoder trained on next-token prediction.

Token and learned position embeddings, ``n_layers`` pre-LayerNorm blocks
(causal multi-head attention, then a GELU MLP, each with a residual), a final
LayerNorm and an untied LM head. Attention uses separate ``q``/``k``/``v``/``o``
``nnx.Linear`` projections, splits heads by reshape and scores with
``jnp.einsum``, so its matmuls are visible as batched ``dot_general``s.

Batches are ``{"tokens": int32 [B, seq_len + 1]}``: the model reads
``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from autoshard.models.common import Batch, Setup, setup_model


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of the decoder (GPT-2 small by default).

    Attributes:
      vocab: vocabulary size.
      d_model: residual stream width; must be divisible by ``n_heads``.
      n_heads: attention heads.
      n_layers: decoder blocks.
      seq_len: tokens the model reads per example (the maximum position).
      d_ff: hidden width of each block's MLP.
    """

    vocab: int = 50257
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    seq_len: int = 1024
    d_ff: int = 3072

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def tiny() -> GPTConfig:
    """A config small enough for CPU tests.

    Example:
      >>> tiny().d_head
      16
    """
    return GPTConfig(vocab=128, d_model=64, n_heads=4, n_layers=2, seq_len=16, d_ff=256)


class Attention(nnx.Module):
    """Causal multi-head self-attention on ``[B, T, d_model]``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model {config.d_model} not divisible by n_heads {config.n_heads}")
        d, self.n_heads = config.d_model, config.n_heads
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        return x.reshape(b, t, self.n_heads, d // self.n_heads)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.o(out.reshape(x.shape))


class FeedForward(nnx.Module):
    """``w2(gelu(w1(x)))``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.w1 = nnx.Linear(config.d_model, config.d_ff, rngs=rngs)
        self.w2 = nnx.Linear(config.d_ff, config.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.gelu(self.w1(x)))


class Block(nnx.Module):
    """Pre-LayerNorm decoder block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.attn = Attention(config, rngs)
        self.ln2 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.mlp = FeedForward(config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """Decoder mapping int tokens ``[B, T]`` (``T <= seq_len``) to logits ``[B, T, vocab]``.

    Example:
      >>> model = GPT(tiny(), nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 128)
    """

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.tok_embed = nnx.Embed(config.vocab, config.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(config.seq_len, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, config.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tok_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def loss_fn(model: GPT, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy of ``model`` on ``batch["tokens"]``.

    Example:
      >>> cfg = tiny()
      >>> loss_fn(GPT(cfg, nnx.Rngs(0)), synthetic_batch(cfg, 2, jax.random.key(0))).shape
      ()
    """
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def synthetic_batch(config: GPTConfig, batch_size: int, key: jax.Array) -> Batch:
    """Counting sequences ``t[i+1] = (t[i] + 1) % vocab`` from random starts.

    The next token is a fixed function of the current one, so the loss falls
    within a few steps.

    Returns:
      ``{"tokens": int32 [batch_size, seq_len + 1]}``.

    Example:
      >>> b = synthetic_batch(tiny(), 2, jax.random.key(0))
      >>> b["tokens"].shape, b["tokens"].dtype
      ((2, 17), dtype('int32'))
    """
    start = jax.random.randint(key, (batch_size, 1), 0, config.vocab, jnp.int32)
    offsets = jnp.arange(config.seq_len + 1, dtype=jnp.int32)
    return {"tokens": (start + offsets) % config.vocab}


def setup(
    config: GPTConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3, tx=None
) -> Setup:
    """A GPT, its adamw train step, initial state and one synthetic batch.

    Example:
      >>> s = setup(tiny(), batch_size=2)
      >>> state, metrics = jax.jit(s.train_step)(s.state, s.batch)
      >>> int(state.step)
      1
    """
    return setup_model(GPT, loss_fn, synthetic_batch, config, batch_size, seed, learning_rate, tx)


def demo() -> GPTConfig:
    """The GPT that `demo.py`, the notebooks and `autoshard plan` use by default.

    Example:
      >>> demo().d_model
      128
    """
    return GPTConfig(vocab=256, d_model=128, n_heads=4, n_layers=2, seq_len=32, d_ff=512)


def demo_factory(batch_size: int = 16):
    """(train_step, (state, batch)) of the demo GPT: the factory form the command line
    takes (`autoshard plan autoshard.models.gpt:demo_factory --mesh 2,4`).

    Args:
      batch_size: sequences per batch.

    Returns:
      The adamw train step and its example arguments.

    Example:
      >>> step, (state, batch) = demo_factory(batch_size=2)
      >>> batch["tokens"].shape
      (2, 33)
    """
    s = setup(demo(), batch_size=batch_size, learning_rate=3e-3)
    return s.train_step, (s.state, s.batch)
