"""A GPT-like decoder whose MLPs are GShard/Switch-style mixture-of-experts layers.

Each of the ``n_layers`` pre-LayerNorm blocks is causal attention (the
:class:`autoshard.models.gpt.Attention` module) followed by an MoE layer:

* tokens are routed in groups: group ``g`` is example ``g`` of the batch, its
  ``S = seq_len`` tokens compete for the experts' buffers;
* a router (``d_model -> n_experts``, no bias) scores each token; its two best
  experts (two ``argmax``es, as in GShard) receive it with gates renormalised to
  sum to one;
* each expert takes at most ``capacity`` tokens per group, in token order (the
  slot is a ``cumsum`` over the group); the overflow is dropped and passes by
  the residual only;
* the routing becomes two tensors of one-hot masks, ``dispatch`` and
  ``combine`` ``[G, S, E, C]``, applied by ``jnp.einsum``: tokens
  ``[G, S, d] -> [E, G, C, d]``, the stacked expert weights ``[E, d, f]`` and
  ``[E, f, d]`` (``nnx.Param``) act per expert, and the results come back as
  ``[G, S, d]`` weighted by the gates;
* the load-balancing loss ``E * sum_e f_e * p_e`` (``f_e`` the fraction of a
  group's tokens whose first choice is expert ``e``, ``p_e`` its mean router
  probability; 1 when balanced) is averaged over groups and layers and added to
  the loss with weight ``aux_loss_weight``.

Split over a mesh, the expert dimension ``E`` is expert parallelism and the group
dimension ``G`` data parallelism; moving from one to the other is an all-to-all.

Batches are ``{"tokens": int32 [B, seq_len + 1]}``: the model reads
``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from autoshard.models import gpt
from autoshard.models.common import Batch, Setup, setup_model
from autoshard.models.gpt import Attention

TOP_K = 2  # experts per token: GShard's top-2 gating


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sizes of the MoE decoder.

    Attributes:
      vocab: vocabulary size.
      d_model: residual stream width; must be divisible by ``n_heads``.
      n_heads: attention heads.
      n_layers: decoder blocks, each attention then an MoE layer.
      seq_len: tokens per example; also the routing group size.
      n_experts: experts per MoE layer (at least 2 for top-2 gating).
      d_ff: hidden width of each expert.
      capacity_factor: each expert's buffer holds
        ``ceil(capacity_factor * 2 * seq_len / n_experts)`` tokens per group.
      aux_loss_weight: weight of the load-balancing loss in the total loss.
    """

    vocab: int = 32000
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 4
    seq_len: int = 256
    n_experts: int = 8
    d_ff: int = 2048
    capacity_factor: float = 1.25
    aux_loss_weight: float = 1e-2

    def __post_init__(self):
        sizes = ("vocab", "d_model", "n_heads", "n_layers", "seq_len", "n_experts", "d_ff")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {self}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_experts < TOP_K:
            raise ValueError(f"top-{TOP_K} gating needs n_experts >= {TOP_K}, got {self.n_experts}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")

    @property
    def capacity(self) -> int:
        """Tokens each expert accepts per group (one example)."""
        return max(1, math.ceil(self.capacity_factor * TOP_K * self.seq_len / self.n_experts))


def tiny() -> MoEConfig:
    """A config small enough for CPU tests.

    Example:
      >>> tiny().capacity
      3
    """
    return MoEConfig(
        vocab=64, d_model=32, n_heads=2, n_layers=1, seq_len=8, n_experts=8, d_ff=64,
        capacity_factor=1.5,
    )  # fmt: skip


def _slots(mask: jax.Array, offset: jax.Array | int) -> jax.Array:
    """Buffer slot of each routed token: its rank among the group's tokens sent to
    the same expert, after ``offset`` slots already taken. mask: [G, S, E] 0/1."""
    return (jnp.cumsum(mask, axis=1) - 1 + offset) * mask


def route(probs: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-2 routing with a per-group expert capacity.

    Args:
      probs: router probabilities ``[G, S, E]``.
      capacity: slots per expert and group (``C``).

    Returns:
      ``(dispatch, combine, aux)``: ``dispatch`` ``[G, S, E, C]`` is 1 where a token
      fills a slot; ``combine`` is the same with the token's gate instead of 1; ``aux``
      is the load-balancing loss (a scalar, 1 when routing is balanced).

    Example:
      >>> probs = jnp.array([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]])  # G=1, S=2, E=3
      >>> dispatch, combine, aux = route(probs, capacity=1)
      >>> dispatch.sum(axis=(2, 3)).tolist()  # the 2nd token lost expert 0 to the 1st
      [[2.0, 0.0]]
      >>> [round(float(g), 3) for g in combine[0, 0, :, 0]]
      [0.778, 0.222, 0.0]
    """
    n_experts = probs.shape[-1]
    mask1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), n_experts, dtype=probs.dtype)
    mask2 = jax.nn.one_hot(jnp.argmax(probs * (1 - mask1), axis=-1), n_experts, dtype=probs.dtype)
    # Switch/GShard balance loss: first-choice fraction times mean probability.
    aux = n_experts * jnp.mean(jnp.sum(mask1.mean(axis=1) * probs.mean(axis=1), axis=-1))
    gate1, gate2 = jnp.sum(probs * mask1, axis=-1), jnp.sum(probs * mask2, axis=-1)
    denom = gate1 + gate2
    gate1, gate2 = gate1 / denom, gate2 / denom
    # First choices take slots before second choices (GShard's priority).
    slot1 = _slots(mask1, 0)
    mask1 = mask1 * (slot1 < capacity)  # tokens past the buffer are dropped
    slot2 = _slots(mask2, jnp.sum(mask1, axis=1, keepdims=True))
    mask2 = mask2 * (slot2 < capacity)
    dispatch = combine = 0
    for gate, mask, slot in ((gate1, mask1, slot1), (gate2, mask2, slot2)):
        index = jnp.sum(slot * mask, axis=-1).astype(jnp.int32)  # [G, S]
        sent = mask[..., None] * jax.nn.one_hot(index, capacity, dtype=probs.dtype)[..., None, :]
        dispatch = dispatch + sent
        combine = combine + gate[..., None, None] * sent
    return dispatch, combine, aux


class MoELayer(nnx.Module):
    """Top-2 mixture of ``n_experts`` GELU MLPs on ``[G, S, d_model]``; returns
    ``(output, aux_loss)``.

    Example:
      >>> layer = MoELayer(tiny(), nnx.Rngs(0))
      >>> y, aux = jax.eval_shape(layer, jnp.ones((2, 8, 32)))  # or layer(x): same shapes
      >>> y.shape, aux.shape, layer.w_in.shape
      ((2, 8, 32), (), (8, 32, 64))
    """

    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        e, d, f = config.n_experts, config.d_model, config.d_ff
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        self.capacity = config.capacity
        self.router = nnx.Linear(d, e, use_bias=False, rngs=rngs)
        self.w_in = nnx.Param(init(rngs.params(), (e, d, f)))
        self.w_out = nnx.Param(init(rngs.params(), (e, f, d)))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        probs = jax.nn.softmax(self.router(x), axis=-1)
        dispatch, combine, aux = route(probs, self.capacity)
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, x)
        h = jax.nn.gelu(jnp.einsum("egcd,edf->egcf", expert_in, self.w_in[...]))
        expert_out = jnp.einsum("egcf,efd->egcd", h, self.w_out[...])
        return jnp.einsum("gsec,egcd->gsd", combine, expert_out), aux


class Block(nnx.Module):
    """``x + attn(ln1(x))``, then ``x + moe(ln2(x))``; returns ``(x, aux_loss)``."""

    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.attn = Attention(config, rngs)  # reads only d_model and n_heads
        self.ln2 = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.moe = MoELayer(config, rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x + self.attn(self.ln1(x))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class MoE(nnx.Module):
    """Decoder mapping int tokens ``[B, T]`` (``T <= seq_len``) to
    ``(logits [B, T, vocab], aux_loss)``, the load-balancing loss averaged over layers.

    Example:
      >>> model = MoE(tiny(), nnx.Rngs(0))
      >>> logits, aux = jax.eval_shape(model, jnp.zeros((2, 8), jnp.int32))
      >>> logits.shape, aux.shape
      ((2, 8, 64), ())
    """

    def __init__(self, config: MoEConfig, rngs: nnx.Rngs):
        self.tok_embed = nnx.Embed(config.vocab, config.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(config.seq_len, config.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, config.vocab, rngs=rngs)
        self.aux_loss_weight = config.aux_loss_weight  # static: part of the graphdef

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.tok_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
        aux = []
        for block in self.blocks:
            x, a = block(x)
            aux.append(a)
        return self.head(self.ln_f(x)), sum(aux) / len(aux)


def loss_fn(model: MoE, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy plus the load-balancing loss weighted by the
    model's ``MoEConfig.aux_loss_weight``.

    Args:
      model: the decoder.
      batch: ``{"tokens": int32 [B, T + 1]}``.

    Example:
      >>> cfg = tiny()
      >>> model, batch = MoE(cfg, nnx.Rngs(0)), synthetic_batch(cfg, 2, jax.random.key(0))
      >>> jax.eval_shape(loss_fn, model, batch).shape
      ()
    """
    tokens = batch["tokens"]
    logits, aux = model(tokens[:, :-1])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return xent + model.aux_loss_weight * aux


def synthetic_batch(config: MoEConfig, batch_size: int, key: jax.Array) -> Batch:
    """The GPT's counting sequences (:func:`autoshard.models.gpt.synthetic_batch`): the
    next token is a fixed function of the current one, so the loss falls fast.

    Returns:
      ``{"tokens": int32 [batch_size, seq_len + 1]}``.

    Example:
      >>> b = synthetic_batch(tiny(), 2, jax.random.key(0))
      >>> b["tokens"].shape, b["tokens"].dtype
      ((2, 9), dtype('int32'))
    """
    return gpt.synthetic_batch(config, batch_size, key)


def setup(
    config: MoEConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3, tx=None
) -> Setup:
    """An MoE decoder, its adamw train step, initial state and one synthetic batch.

    Example:
      >>> s = setup(tiny(), batch_size=2)
      >>> s.state.params["blocks"][0]["moe"]["w_in"].shape
      (8, 32, 64)
      >>> state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
      >>> metrics["loss"].shape
      ()
    """
    return setup_model(MoE, loss_fn, synthetic_batch, config, batch_size, seed, learning_rate, tx)
