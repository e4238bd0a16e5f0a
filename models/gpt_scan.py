"""The GPT of :mod:`autoshard.models.gpt` with its blocks stacked and run by ``nnx.scan``.

The usual large-model habit (MaxText, the Flax NNX guides): the ``n_layers``
blocks are built once by ``nnx.vmap`` over split rngs, so every block
parameter has a leading layer dimension (``params["blocks"]["attn"]["q"]
["kernel"]`` is ``[n_layers, d_model, d_model]``), and the forward pass runs
one block body under ``nnx.scan``. The traced train step therefore holds a
``scan`` primitive for the forward pass and a reversed one for the backward
pass, each with the block's ``dot_general``s in its body, instead of
``n_layers`` unrolled copies.

Config, batches and the loss are those of :mod:`autoshard.models.gpt`; the
block is :class:`autoshard.models.gpt.Block`. Initial values differ from the
unrolled model (the layer keys are split differently).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from autoshard.models import gpt
from autoshard.models.common import Setup, setup_model
from autoshard.models.gpt import Block, GPTConfig, loss_fn, synthetic_batch

__all__ = ["GPT", "GPTConfig", "loss_fn", "setup", "synthetic_batch", "tiny"]


def tiny() -> GPTConfig:
    """The CPU-test config of :func:`autoshard.models.gpt.tiny`.

    Example:
      >>> tiny() == gpt.tiny()
      True
    """
    return gpt.tiny()


def stacked_blocks(config: GPTConfig, rngs: nnx.Rngs) -> Block:
    """One :class:`~autoshard.models.gpt.Block` whose every parameter has a leading
    ``n_layers`` dimension, each layer initialised from its own key.

    Example:
      >>> blocks = stacked_blocks(tiny(), nnx.Rngs(0))
      >>> blocks.mlp.w1.kernel.shape
      (2, 64, 256)
    """

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs)

    return make(rngs)


class GPT(nnx.Module):
    """Decoder mapping int tokens ``[B, T]`` (``T <= seq_len``) to logits ``[B, T, vocab]``.

    Example:
      >>> model = GPT(tiny(), nnx.Rngs(0))
      >>> model.blocks.attn.q.kernel.shape
      (2, 64, 64)
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 128)
    """

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.tok_embed = nnx.Embed(config.vocab, config.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(config.seq_len, config.d_model, rngs=rngs)
        self.blocks = stacked_blocks(config, rngs)
        self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, config.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tok_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))

        # The residual stream is the carry; the stacked block is scanned along axis 0.
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        return self.head(self.ln_f(run(x, self.blocks)))


def setup(
    config: GPTConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3, tx=None
) -> Setup:
    """A scanned GPT, its train step (``tx``, default ``optax.adamw(learning_rate)``),
    initial state and one synthetic batch.

    Example:
      >>> s = setup(tiny(), batch_size=2)
      >>> s.state.params["blocks"]["mlp"]["w2"]["kernel"].shape
      (2, 256, 64)
      >>> state, metrics = jax.jit(s.train_step)(s.state, s.batch)
      >>> int(state.step)
      1
    """
    return setup_model(GPT, loss_fn, synthetic_batch, config, batch_size, seed, learning_rate, tx)
