"""Attention and loss computed block by block, so that real sequence lengths and
vocabularies fit device memory: no ``[T, T]`` score matrix and no whole
``[B, T, vocab]`` float32 logits exist at once. Each is a ``jax.custom_vjp`` whose
backward pass recomputes a block from what its forward pass saved (as
FlashAttention does), written with ``lax.scan`` and ordinary primitives so the
planner sees and shards every matmul.
"""

import functools

import jax
import jax.numpy as jnp

_NEG = -1e30  # a masked score: exp(_NEG - m) is 0 for any finite running maximum m


def _block_scores(q, k_blk, start):
    """Causal scores ``[B, heads, T, block]`` of all queries against the key block whose
    first position is ``start`` (int ``[B]``), in float32, and the mask."""
    t, dh, block = q.shape[1], q.shape[-1], k_blk.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_blk).astype(jnp.float32) / jnp.sqrt(dh)
    k_pos = start[:, None] + jnp.arange(block)[None, :]  # [B, block]
    keep = (jnp.arange(t)[None, :, None] >= k_pos[:, None, :])[:, None]  # [B, 1, T, block]
    return jnp.where(keep, s, _NEG), keep


def _zeros_per_example(q):
    """int32 zeros ``[B]`` that depend on ``q`` (``argmax`` over one element is 0,
    whatever its value). Without the dependency, ``jax.grad`` of a ``lax.scan`` over
    layers hoists the causal masks, which depend on nothing the layer loop carries,
    out of the loop and keeps every key block's mask broadcast to ``[B, heads, T,
    block]``: gigabytes of booleans at real sizes. Per example (not one scalar), so
    the masks split with the batch and need no collective."""
    return jnp.argmax(q[:, :1, :1, :1].reshape(q.shape[0], 1), axis=-1).astype(jnp.int32)


def _kv_blocks(x, block):
    """[B, T, H, D] -> [T / block, B, block, H, D]: the scan's per-block inputs."""
    b, t, h, d = x.shape
    return x.reshape(b, t // block, block, h, d).transpose(1, 0, 2, 3, 4)


def _flash_fwd(q, k, v, block):
    b, t, h, dh = q.shape
    zeros = _zeros_per_example(q)

    def body(carry, xs):
        m, denom, acc = carry
        j, k_blk, v_blk = xs
        s, keep = _block_scores(q, k_blk, zeros + j * block)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(keep, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        denom = denom * scale + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v_blk).astype(jnp.float32)
        return (m_new, denom, acc * scale[..., None] + pv), None

    init = (
        jnp.full((b, h, t), _NEG, jnp.float32),
        jnp.zeros((b, h, t), jnp.float32),
        jnp.zeros((b, h, t, dh), jnp.float32),
    )
    xs = (jnp.arange(t // block), _kv_blocks(k, block), _kv_blocks(v, block))
    (m, denom, acc), _ = jax.lax.scan(body, init, xs)
    out = (acc / denom[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, H, D]
    return out, (q, k, v, out, m + jnp.log(denom))


def _flash_bwd(block, res, d_out):
    q, k, v, out, lse = res
    t, dh = q.shape[1], q.shape[-1]
    zeros = _zeros_per_example(q)
    # D_i = sum_d dO * O: the softmax's correction term, per query
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def body(dq, xs):
        j, k_blk, v_blk = xs
        s, keep = _block_scores(q, k_blk, zeros + j * block)
        p = jnp.where(keep, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out)
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v_blk).astype(jnp.float32)
        ds = (p * (dp - delta[..., None]) / jnp.sqrt(dh)).astype(q.dtype)
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk).astype(jnp.float32)
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
        return dq, (dk, dv)

    xs = (jnp.arange(t // block), _kv_blocks(k, block), _kv_blocks(v, block))
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), xs)

    def unblock(x):  # [T / block, B, block, H, D] -> [B, T, H, D]
        return x.transpose(1, 0, 2, 3, 4).reshape(k.shape)

    return dq.astype(q.dtype), unblock(dk), unblock(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, block):
    return _flash_fwd(q, k, v, block)[0]


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Causal softmax attention of ``q, k, v [B, T, heads, d]`` computed over key blocks
    of ``block`` positions with a running maximum and sum (Dao et al. 2022,
    "FlashAttention"): no ``[T, T]`` score matrix is ever whole. The backward pass
    recomputes each block's probabilities from the saved log-sum-exp, so only
    ``q, k, v``, the output and one ``[B, heads, T]`` vector are kept for it.

    Args:
      q, k, v: ``[B, T, heads, d]``, kv already repeated to the query heads.
      block: key/value block length; must divide ``T``.

    Returns:
      ``[B, T, heads, d]``, equal to plain causal attention up to rounding.

    Example:
      >>> q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
      >>> s = jnp.einsum("bqhd,bkhd->bhqk", q, q) / 2.0
      >>> s = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, -jnp.inf)
      >>> ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), q)
      >>> bool(jnp.allclose(flash_attention(q, q, q, 4), ref, atol=1e-5))
      True
    """
    return _flash(q, k, v, block)


def _chunks(x, chunk):
    """[B, T, ...] -> [T / chunk, B, chunk, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _ce_fwd(h, w, labels, chunk):
    def body(total, xs):
        h_c, y_c = xs
        logits = jnp.einsum("btd,dv->btv", h_c, w).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        return total + (lse - picked).sum(), lse

    total, lse = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (_chunks(h, chunk), _chunks(labels, chunk))
    )
    return total / labels.size, (h, w, labels, lse)


def _ce_bwd(chunk, res, d_loss):
    h, w, labels, lse = res
    scale = d_loss / labels.size

    def body(dw, xs):
        h_c, y_c, lse_c = xs
        logits = jnp.einsum("btd,dv->btv", h_c, w).astype(jnp.float32)
        onehot = jax.nn.one_hot(y_c, w.shape[1], dtype=jnp.float32)
        d_logits = ((jnp.exp(logits - lse_c[..., None]) - onehot) * scale).astype(h.dtype)
        dh = jnp.einsum("btv,dv->btd", d_logits, w)
        dw = dw + jnp.einsum("btd,btv->dv", h_c, d_logits).astype(jnp.float32)
        return dw, dh

    xs = (_chunks(h, chunk), _chunks(labels, chunk), lse)
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    dh = jnp.moveaxis(dh, 0, 1).reshape(h.shape)
    return dh, dw.astype(w.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce(h, w, labels, chunk):
    return _ce_fwd(h, w, labels, chunk)[0]


_ce.defvjp(_ce_fwd, _ce_bwd)


def chunked_cross_entropy(h: jax.Array, w: jax.Array, labels: jax.Array, chunk: int) -> jax.Array:
    """Mean softmax cross-entropy of the logits ``h @ w`` (in float32) against integer
    ``labels``, over sequence chunks of ``chunk`` positions: only one chunk's logits
    exist at a time, forward or backward (the backward pass recomputes them from the
    saved log-sum-exp).

    Args:
      h: ``[B, T, d]`` the head's input.
      w: ``[d, vocab]`` the head's kernel.
      labels: int ``[B, T]``.
      chunk: positions per chunk; must divide ``T``.

    Returns:
      A float32 scalar, equal to
      ``optax.softmax_cross_entropy_with_integer_labels(h @ w, labels).mean()``.

    Example:
      >>> import optax
      >>> h, w = jnp.ones((2, 4, 3)), jnp.arange(15.0).reshape(3, 5) / 10
      >>> y = jnp.array([[0, 1, 2, 3], [4, 0, 1, 2]])
      >>> ref = optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
      >>> bool(jnp.allclose(chunked_cross_entropy(h, w, y, 2), ref))
      True
    """
    return _ce(h, w, labels, chunk)
