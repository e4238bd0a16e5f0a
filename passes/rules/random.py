"""Randomness: PRNG keys stay whole; the bits they generate may split.

A key (a typed `key<impl>` array, or the raw `uint32[..., 2]` data behind it) is a
few bytes that every device needs entire: seeding, wrapping, unwrapping, folding in
and splitting keep every dimension FIXED. `random_bits` turns a key into a block of
bits of a given shape; the dimensions of that shape pass, so the bits (and the mask
or noise made from them) may split with the values they are applied to. The values
do not depend on the split: with `jax_threefry_partitionable` (the default since jax
0.5) each device generates its own block; without it XLA's partitioner still computes
the same numbers, only with more communication.

`threefry2x32` (the raw hash, seen when a step calls it directly or the key
implementation is inlined) is elementwise over its counts and is registered with the
elementwise family.

    random_bits   key[k...] -> u32[k..., s...]   k: FIXED, s: PASS
    random_split  key[k...] -> key[k..., n...]   all FIXED
"""

from __future__ import annotations

from autoshard.passes.rules.core import FIXED, Builder, FactorMap, OpView, register

KEY_PRIMITIVES = (
    "random_seed",
    "random_wrap",
    "random_unwrap",
    "random_fold_in",
    "random_split",
    "random_clone",
)


@register(*KEY_PRIMITIVES)
def key_whole(op: OpView) -> FactorMap:
    """Keys in, keys (or key data) out: every operand and result stays whole."""
    b = Builder()
    ins = [b.fixed_dims(s) for s in op.in_shapes]
    outs = [b.fixed_dims(s) for s in op.out_shapes]
    return b.build(ins, outs)


@register("random_bits")
def random_bits(op: OpView) -> FactorMap:
    """key[k...] -> bits[k..., *shape]: the key's dimensions stay whole, the generated
    `shape` dimensions may split."""
    b = Builder()
    key = b.fixed_dims(op.in_shapes[0])
    out = op.out_shapes[0]
    bits = tuple((b.new(d),) for d in out[len(key) :])
    return b.build([key], [(*key, *bits)])


@register("bitcast_convert_type")
def bitcast_convert_type(op: OpView) -> FactorMap:
    """Reinterpreting bits (uniform floats from random bits): elementwise when the bit
    widths agree; a width change adds or drops a trailing dimension, kept whole."""
    b = Builder()
    ins, outs = op.in_shapes[0], op.out_shapes[0]
    common = min(len(ins), len(outs))
    dims = [(b.new(d),) for d in ins[:common]]
    extra_in = [(b.new(d, FIXED),) for d in ins[common:]]
    extra_out = [(b.new(d, FIXED),) for d in outs[common:]]
    return b.build([(*dims, *extra_in)], [(*dims, *extra_out)])
