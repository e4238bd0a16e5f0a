"""A Llama-style decoder trained on next-token prediction.

Token embeddings, ``n_layers`` pre-RMSNorm blocks (causal grouped-query
attention with rotary position embeddings, then a SwiGLU MLP, each with a
residual), a final RMSNorm and an untied LM head; no biases anywhere.

Attention has separate ``q``/``k``/``v``/``o`` projections. ``k`` and ``v``
have ``n_kv_heads`` heads, each shared by ``n_heads // n_kv_heads`` query heads:
they are repeated (a broadcast and a reshape) up to ``n_heads`` before the
scores, which ``jnp.einsum`` computes as batched ``dot_general``s.

With ``dtype="bfloat16"`` parameters, activations and matmuls are bf16; RMSNorm
statistics, rotary angles, the softmax and the loss are computed in float32.

Batches are ``{"tokens": int32 [B, seq_len + 1]}``: the model reads
``tokens[:, :-1]`` and is scored on ``tokens[:, 1:]``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from autoshard.models.blockwise import chunked_cross_entropy, flash_attention
from autoshard.models.common import Batch, Setup, setup_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes of the decoder (Llama-2-7B widths with 8 kv heads, as in Llama-2-70B).

    Attributes:
      vocab: vocabulary size.
      d_model: residual stream width; must be divisible by ``n_heads``.
      n_heads: query heads; must be divisible by ``n_kv_heads``.
      n_kv_heads: key/value heads (``n_heads`` for plain multi-head attention).
      n_layers: decoder blocks.
      seq_len: tokens the model reads per example.
      d_ff: hidden width of each block's SwiGLU MLP.
      rope_theta: base of the rotary frequencies.
      norm_eps: RMSNorm epsilon.
      dtype: ``"float32"`` or ``"bfloat16"``, for parameters and compute.
      scan_layers: stack the blocks' parameters along a leading ``n_layers``
        dimension and run them under ``nnx.scan`` (as MaxText's ``scan_layers``),
        so the traced step holds one block body instead of ``n_layers`` copies.
      head_dim: width of one attention head; ``None`` is ``d_model // n_heads``
        (MaxText's scaled models use 128 with ``n_heads * head_dim != d_model``).
      attention: ``"plain"`` materialises the ``[B, heads, T, T]`` scores;
        ``"flash"`` computes them block by block (:func:`flash_attention`), so
        memory grows with ``T`` instead of ``T**2``, as MaxText's ``attention=flash``.
      flash_block: key/value block length of ``"flash"``; must divide ``seq_len``.
      loss_chunk: 0 computes the logits ``[B, T, vocab]`` whole; a length computes
        head and loss over sequence chunks of it (:func:`chunked_cross_entropy`),
        so only one chunk's float32 logits exist at a time; must divide ``seq_len``.

    Example:
      >>> LlamaConfig(n_heads=6, n_kv_heads=4)
      Traceback (most recent call last):
      ...
      ValueError: n_heads 6 is not divisible by n_kv_heads 4
    """

    vocab: int = 32000
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 8
    n_layers: int = 32
    seq_len: int = 4096
    d_ff: int = 11008
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"
    scan_layers: bool = False
    head_dim: int | None = None
    attention: str = "plain"
    flash_block: int = 512
    loss_chunk: int = 0

    def __post_init__(self):
        for name in ("vocab", "d_model", "n_heads", "n_kv_heads", "n_layers", "seq_len", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if self.attention not in ("plain", "flash"):
            raise ValueError(f"attention must be 'plain' or 'flash', got {self.attention!r}")
        if self.attention == "flash" and self.seq_len % min(self.flash_block, self.seq_len):
            raise ValueError(
                f"flash_block {self.flash_block} does not divide seq_len {self.seq_len}"
            )
        if self.loss_chunk and self.seq_len % min(self.loss_chunk, self.seq_len):
            raise ValueError(f"loss_chunk {self.loss_chunk} does not divide seq_len {self.seq_len}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.d_head % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.d_head}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]


def tiny(**overrides) -> LlamaConfig:
    """A config small enough for CPU tests; keyword arguments replace fields.

    Example:
      >>> tiny().d_head, tiny(dtype="bfloat16").jnp_dtype.__name__
      (16, 'bfloat16')
    """
    cfg = LlamaConfig(
        vocab=128, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, seq_len=16, d_ff=128
    )
    return dataclasses.replace(cfg, **overrides)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return x32.astype(x.dtype) * self.scale[...]


def rotary(x: jax.Array, theta: float) -> jax.Array:
    """Rotates channel pairs ``(i, i + d/2)`` of ``x [B, T, heads, d]`` by angle
    ``position * theta ** (-2i / d)``.

    Example:
      >>> x = jnp.ones((1, 3, 2, 4))
      >>> bool(jnp.allclose(rotary(x, 1e4)[:, 0], x[:, 0]))  # position 0 is unrotated
      True
    """
    t, d = x.shape[1], x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _linear(d_in: int, d_out: int, config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    dt = config.jnp_dtype
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings on ``[B, T, d_model]``."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, dh = config.d_model, config.d_head
        self.n_heads, self.n_kv_heads, self.d_head = config.n_heads, config.n_kv_heads, dh
        self.theta = config.rope_theta
        self.flash_block = config.flash_block if config.attention == "flash" else 0
        self.q = _linear(d, config.n_heads * dh, config, rngs)
        self.k = _linear(d, config.n_kv_heads * dh, config, rngs)
        self.v = _linear(d, config.n_kv_heads * dh, config, rngs)
        self.o = _linear(config.n_heads * dh, d, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        dh = self.d_head
        q = rotary(self.q(x).reshape(b, t, self.n_heads, dh), self.theta)
        k = rotary(self.k(x).reshape(b, t, self.n_kv_heads, dh), self.theta)
        v = self.v(x).reshape(b, t, self.n_kv_heads, dh)
        # query head h reads kv head h // group
        group = self.n_heads // self.n_kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        if self.flash_block:
            out = flash_attention(q, k, v, min(self.flash_block, t))
            return self.o(out.reshape(b, t, self.n_heads * dh))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(dh)
        causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.o(out.reshape(b, t, self.n_heads * dh))


class SwiGLU(nnx.Module):
    """``w_down(silu(w_gate(x)) * w_up(x))``."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.w_gate = _linear(config.d_model, config.d_ff, config, rngs)
        self.w_up = _linear(config.d_model, config.d_ff, config, rngs)
        self.w_down = _linear(config.d_ff, config.d_model, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    """Pre-RMSNorm decoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dt = config.jnp_dtype
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, dt)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, dt)
        self.mlp = SwiGLU(config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def stacked_blocks(config: LlamaConfig, rngs: nnx.Rngs) -> Block:
    """One :class:`Block` whose every parameter has a leading ``n_layers`` dimension,
    each layer initialised from its own key (``nnx.vmap`` over split rngs).

    Example:
      >>> blocks = nnx.eval_shape(lambda: stacked_blocks(tiny(), nnx.Rngs(0)))
      >>> blocks.mlp.w_up.kernel.shape
      (2, 64, 128)
    """

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs)

    return make(rngs)


class Llama(nnx.Module):
    """Decoder mapping int tokens ``[B, T]`` (``T <= seq_len``) to logits ``[B, T, vocab]``.

    Example (shapes only: ``nnx.eval_shape`` builds the model without initialising it):
      >>> model = nnx.eval_shape(lambda: Llama(tiny(), nnx.Rngs(0)))
      >>> jax.eval_shape(lambda m, t: m(t), model, jnp.zeros((2, 16), jnp.int32)).shape
      (2, 16, 128)
    """

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dt = config.jnp_dtype
        self.embed = nnx.Embed(config.vocab, config.d_model, dtype=dt, param_dtype=dt, rngs=rngs)
        self.scan_layers = config.scan_layers
        self.loss_chunk = min(config.loss_chunk, config.seq_len)
        if config.scan_layers:
            self.blocks = stacked_blocks(config, rngs)
        else:
            self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.d_model, config.norm_eps, dt)
        self.head = _linear(config.d_model, config.vocab, config, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.hidden(tokens))

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """The final normalised residual stream ``[B, T, d_model]`` (the head's input)."""
        x = self.embed(tokens)
        if self.scan_layers:
            # The residual stream is the carry; the stacked block is scanned along axis 0.
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x: jax.Array, block: Block) -> jax.Array:
                return block(x)

            return self.norm(run(x, self.blocks))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def loss_fn(model: Llama, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy (in float32) of ``model`` on ``batch["tokens"]``.

    Example:
      >>> cfg = tiny(dtype="bfloat16")
      >>> model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
      >>> loss = jax.eval_shape(loss_fn, model, synthetic_batch(cfg, 2, jax.random.key(0)))
      >>> loss.shape, loss.dtype
      ((), dtype('float32'))
    """
    tokens = batch["tokens"]
    if model.loss_chunk:
        h = model.hidden(tokens[:, :-1])
        return chunked_cross_entropy(h, model.head.kernel[...], tokens[:, 1:], model.loss_chunk)
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def synthetic_batch(config: LlamaConfig, batch_size: int, key: jax.Array) -> Batch:
    """Sequences that step by a per-example stride: ``t[i+1] = (t[i] + s) % vocab``,
    random start and ``s`` in ``{1, 2}``.

    The next token follows from the previous two, so attention (not only the
    current token) is needed to drive the loss to zero; it falls within a few steps.

    Returns:
      ``{"tokens": int32 [batch_size, seq_len + 1]}``.

    Example:
      >>> b = synthetic_batch(tiny(), 2, jax.random.key(0))
      >>> b["tokens"].shape, b["tokens"].dtype
      ((2, 17), dtype('int32'))
    """
    k_start, k_stride = jax.random.split(key)
    start = jax.random.randint(k_start, (batch_size, 1), 0, config.vocab, jnp.int32)
    stride = jax.random.randint(k_stride, (batch_size, 1), 1, 3, jnp.int32)
    offsets = jnp.arange(config.seq_len + 1, dtype=jnp.int32)
    return {"tokens": (start + stride * offsets) % config.vocab}


def setup(
    config: LlamaConfig, batch_size: int, seed: int = 0, learning_rate: float = 1e-3, tx=None
) -> Setup:
    """A Llama, its adamw train step (default), initial state and one synthetic batch.

    Example:
      >>> s = setup(tiny(), batch_size=2)
      >>> s.state.params["blocks"][0]["attn"]["k"]["kernel"].shape  # 2 kv heads of 16
      (64, 32)
      >>> state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
      >>> metrics["loss"].shape, metrics["loss"].dtype
      ((), dtype('float32'))
    """
    return setup_model(Llama, loss_fn, synthetic_batch, config, batch_size, seed, learning_rate, tx)


def llama3_1_8b(**overrides) -> LlamaConfig:
    """Llama 3.1 8B's shape (Meta's model card): 32 layers, d_model 4096, 32 query and
    8 kv heads, SwiGLU width 14336, vocab 128256, rope theta 500000; bf16, layers
    scanned, flash attention, loss in chunks of 1024 tokens, sequence 8192 (MaxText's
    v6e benchmark). Keyword arguments replace fields.

    Example:
      >>> llama3_1_8b().d_head, llama3_1_8b(seq_len=4096).seq_len
      (128, 4096)
    """
    cfg = LlamaConfig(
        vocab=128256,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        n_layers=32,
        seq_len=8192,
        d_ff=14336,
        rope_theta=500000.0,
        dtype="bfloat16",
        scan_layers=True,
        attention="flash",
        loss_chunk=1024,
    )
    return dataclasses.replace(cfg, **overrides)
