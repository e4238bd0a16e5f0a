"""Unit tests of the factor rules: one factor map per primitive, on real jaxpr equations.

Factor maps are rendered einsum-style: letters name factors in order of first
appearance (operands, then outputs), a parenthesised group is a compound dimension
(major first), ``_`` is a dimension with no factor (a broadcast size-1 dimension), and
the kinds follow, e.g. ``"ab,bc->ac reduce=b"``. Factors that appear in no dimension are
listed as ``unused=`` unless FIXED (an unused FIXED factor can never be split: harmless).
"""

import warnings
from string import ascii_letters

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from autoshard.passes import jax_core
from autoshard.passes.rules import (
    FIXED,
    PASS,
    REDUCE,
    RULES,
    Factor,
    FactorMap,
    OpView,
    core,
    factor_map,
    has_rule,
    replicated_rule,
)

# ---------------------------------------------------------------- helpers


def _flat_eqns(jaxpr):
    """Equations of a jaxpr with call-like primitives (jit, custom_jvp, ...) inlined."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in jax_core.INLINE_BODY_PARAM:
            body, _ = jax_core.split_closed(eqn.params[jax_core.INLINE_BODY_PARAM[name]])
            yield from _flat_eqns(body)
        else:
            yield eqn


def _view(eqn) -> OpView:
    return OpView(
        eqn.primitive.name,
        tuple(tuple(v.aval.shape) for v in eqn.invars),
        tuple(tuple(v.aval.shape) for v in eqn.outvars),
        eqn.params,
    )


def views(fn, *args) -> list[OpView]:
    return [_view(e) for e in _flat_eqns(jax.make_jaxpr(fn)(*args).jaxpr)]


def view_of(primitive: str, fn, *args) -> OpView:
    found = [v for v in views(fn, *args) if v.primitive == primitive]
    assert len(found) == 1, [v.primitive for v in views(fn, *args)]
    return found[0]


def fmap_of(primitive: str, fn, *args) -> FactorMap:
    return factor_map(view_of(primitive, fn, *args))


def _letters(fmap: FactorMap) -> dict[int, str]:
    order: list[int] = []
    for dims in (*fmap.operands, *fmap.outputs):
        for dim in dims:
            for f in dim:
                if f not in order:
                    order.append(f)
    order += [f for f in range(len(fmap.factors)) if f not in order]
    return {f: ascii_letters[k] for k, f in enumerate(order)}


def render(fmap: FactorMap) -> str:
    name = _letters(fmap)

    def dim(d):
        if not d:
            return "_"
        s = "".join(name[f] for f in d)
        return s if len(d) == 1 else f"({s})"

    def tensor(dims):
        return "".join(dim(d) for d in dims)

    text = ",".join(map(tensor, fmap.operands)) + "->" + ",".join(map(tensor, fmap.outputs))
    used = {f for dims in (*fmap.operands, *fmap.outputs) for d in dims for f in d}
    shown = [f for f in range(len(fmap.factors)) if f in used or fmap.factors[f].kind != FIXED]
    by_letter = sorted(shown, key=lambda f: name[f])
    reduce = [
        name[f] + ("" if fmap.factors[f].reduce_op == "sum" else f"({fmap.factors[f].reduce_op})")
        for f in by_letter
        if fmap.factors[f].kind == REDUCE
    ]
    fixed = [name[f] for f in by_letter if fmap.factors[f].kind == FIXED]
    unused = [name[f] for f in by_letter if f not in used]
    for label, items in (("reduce", reduce), ("fixed", fixed), ("unused", unused)):
        if items:
            text += f" {label}={''.join(items)}"
    return text


def splittable(fmap: FactorMap) -> str:
    name = _letters(fmap)
    return "".join(sorted(name[f] for f, ok in enumerate(fmap.splittable()) if ok))


def f32(*shape):
    return jnp.zeros(shape, jnp.float32)


def i32(*shape):
    return jnp.zeros(shape, jnp.int32)


# ---------------------------------------------------------------- render helper itself


def test_render_names_factors_by_first_appearance():
    fm = FactorMap(
        (Factor(4, REDUCE), Factor(2), Factor(3, FIXED), Factor(5, REDUCE, "max")),
        (((1,), (0,)), ((0, 2),)),
        (((1,), (), (3,)),),
    )
    assert render(fm) == "ab,(bc)->a_d reduce=bd(max) fixed=c"


# ---------------------------------------------------------------- dot_general


def test_dot_general_matmul():
    fm = fmap_of("dot_general", jnp.matmul, f32(8, 16), f32(16, 32))
    assert render(fm) == "ab,bc->ac reduce=b"
    assert [f.size for f in fm.factors if f.kind == REDUCE] == [16]
    assert splittable(fm) == "abc"


def test_dot_general_batched():
    fm = fmap_of(
        "dot_general", lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y), f32(2, 8, 16), f32(2, 16, 4)
    )
    assert render(fm) == "abc,acd->abd reduce=c"


def test_dot_general_attention_scores():
    fm = fmap_of(
        "dot_general",
        lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k),
        f32(2, 8, 4, 16),
        f32(2, 6, 4, 16),
    )
    # lhs b q h d, rhs b k h d -> out b h q k (batch dims first, then free dims)
    assert render(fm) == "abcd,aecd->acbe reduce=d"
    assert all(f.kind == PASS for f in fm.factors if f.size in (2, 4, 8, 6))


# ---------------------------------------------------------------- elementwise


def test_unary_elementwise():
    fm = fmap_of("exp", jnp.exp, f32(8, 16))
    assert render(fm) == "ab->ab"
    assert splittable(fm) == "ab"


def test_binary_same_shape():
    assert render(fmap_of("mul", jnp.multiply, f32(8, 16), f32(8, 16))) == "ab,ab->ab"


def test_binary_with_rank0_literal():
    fm = fmap_of("mul", lambda x: x * 2.0, f32(8, 16))
    assert render(fm) == "ab,->ab"


def test_binary_with_size1_broadcast():
    vs = views(lambda x, b: x + b[None], f32(8, 16), f32(16))
    add = next(v for v in vs if v.primitive == "add")
    assert add.in_shapes == ((8, 16), (1, 16))  # what jax 0.10 emits for x + b[None]
    assert render(factor_map(add)) == "ab,_b->ab"


def test_select_n_with_predicate_of_same_shape():
    fm = fmap_of("select_n", lambda x, y: jnp.where(x > 0, x, y), f32(8, 16), f32(8, 16))
    assert render(fm) == "ab,ab,ab->ab"


def test_select_n_with_scalar_predicate():
    fm = fmap_of("select_n", lambda p, x, y: lax.select_n(p, x, y), True, f32(4), f32(4))
    assert render(fm) == ",a,a->a"


def test_convert_element_type():
    fm = fmap_of("convert_element_type", lambda x: x.astype(jnp.int32), f32(8, 16))
    assert render(fm) == "ab->ab"


def test_integer_ops():
    fm = fmap_of("shift_right_logical", lambda x: lax.shift_right_logical(x, 3), i32(8, 16))
    assert render(fm) == "ab,->ab"
    fm = fmap_of("and", lambda x, y: x & y, i32(8, 16), i32(8, 16))
    assert render(fm) == "ab,ab->ab"
    assert render(fmap_of("rem", lambda x: x % 7, i32(8))) == "a,->a"


def test_clamp_with_scalar_bounds():
    fm = fmap_of("clamp", lambda x: lax.clamp(0.0, x, 1.0), f32(8, 16))
    assert render(fm) == ",ab,->ab"


# ---------------------------------------------------------------- reductions


def test_reduce_sum():
    fm = fmap_of("reduce_sum", lambda x: x.sum(axis=1), f32(8, 16))
    assert render(fm) == "ab->a reduce=b"
    assert splittable(fm) == "ab"


def test_reduce_max_over_two_axes():
    fm = fmap_of("reduce_max", lambda x: x.max(axis=(0, 2)), f32(4, 8, 16))
    assert render(fm) == "abc->b reduce=a(max)c(max)"


def test_reduce_sum_to_scalar():
    assert render(fmap_of("reduce_sum", jnp.sum, f32(4, 8))) == "ab-> reduce=ab"


def test_argmax_axis_is_fixed():
    fm = fmap_of("argmax", lambda x: jnp.argmax(x, axis=1), f32(8, 16))
    assert render(fm) == "ab->a fixed=b"
    assert splittable(fm) == "a"


def test_cumsum_axis_is_fixed():
    fm = fmap_of("cumsum", lambda x: jnp.cumsum(x, axis=1), f32(8, 16))
    assert render(fm) == "ab->ab fixed=b"
    assert splittable(fm) == "a"


def test_sort_dimension_is_fixed():
    fm = fmap_of("sort", lambda x: jnp.sort(x, axis=0), f32(8, 16))
    assert render(fm) == "ab->ab fixed=a"


def test_argsort_sorts_keys_and_iota_together():
    fm = fmap_of("sort", lambda x: jnp.argsort(x, axis=1), f32(8, 16))
    assert render(fm) == "ab,ab->ab,ab fixed=b"


def test_top_k_last_axis():
    fm = fmap_of("top_k", lambda x: lax.top_k(x, 3), f32(8, 16))
    # values and indices get separate (both FIXED) k factors: equivalent, as neither splits
    assert render(fm) == "ab->ac,ad fixed=bcd"
    assert [fm.factors[f[0]].size for f in fm.outputs[0]] == [8, 3]
    assert splittable(fm) == "a"


def test_top_k_non_last_axis():
    fm = fmap_of("top_k", lambda x: lax.top_k(x, 3, axis=0), f32(8, 16))
    assert render(fm) == "ab->cb,db fixed=acd"


# ---------------------------------------------------------------- structural


def test_broadcast_in_dim_adds_dims():
    fm = fmap_of("broadcast_in_dim", lambda x: jnp.broadcast_to(x, (4, 8, 16)), f32(8, 16))
    assert render(fm) == "ab->cab"


def test_broadcast_in_dim_size1_operand_dim_has_no_factor():
    fm = fmap_of("broadcast_in_dim", lambda x: jnp.broadcast_to(x, (4, 8, 16)), f32(8, 1))
    assert render(fm) == "a_->bac"


def test_broadcast_in_dim_of_scalar():
    fm = fmap_of("broadcast_in_dim", lambda x: jnp.broadcast_to(x, (4, 8)), jnp.float32(1))
    assert render(fm) == "->ab"


def test_expand_dims_is_broadcast_in_dim():
    fm = fmap_of("broadcast_in_dim", lambda x: jnp.expand_dims(x, 1), f32(6, 4))
    assert render(fm) == "ab->acb"
    assert fm.factors[_factor(fm, "c")].size == 1
    assert splittable(fm) == "ab"


def test_expand_dims_rule():
    fm = factor_map(OpView("expand_dims", ((6, 4),), ((6, 1, 4),), {"dimensions": (1,)}))
    assert render(fm) == "ab->a_b"


def _factor(fm: FactorMap, letter: str) -> int:
    return {v: k for k, v in _letters(fm).items()}[letter]


def test_reshape_split_gives_compound_dim():
    fm = fmap_of("reshape", lambda x: x.reshape(6, 2, 2), f32(6, 4))
    assert render(fm) == "a(bc)->abc"
    assert splittable(fm) == "ab"  # the major part of the split dim, not the minor


def test_reshape_merge():
    fm = fmap_of("reshape", lambda x: x.reshape(24), f32(6, 4))
    assert render(fm) == "ab->(ab)"
    assert splittable(fm) == "a"


def test_reshape_merge_and_split_heads():
    fm = fmap_of("reshape", lambda x: x.reshape(2, 8, 4, 16), f32(2, 8, 64))
    assert render(fm) == "ab(cd)->abcd"
    assert splittable(fm) == "abc"


def test_reshape_without_common_refinement_is_fixed():
    fm = fmap_of("reshape", lambda x: x.reshape(4, 6), f32(6, 4))
    assert render(fm) == "ab->cd fixed=abcd"
    assert splittable(fm) == ""


def test_reshape_inserts_size1_dim():
    fm = fmap_of("reshape", lambda x: x.reshape(6, 1, 4), f32(6, 4))
    assert render(fm) == "ab->acb fixed=c"
    assert splittable(fm) == "ab"


def test_reshape_drops_size1_dim():
    fm = factor_map(OpView("reshape", ((6, 1, 4),), ((6, 4),), {"new_sizes": (6, 4)}))
    assert render(fm) == "abc->ac fixed=b"


def test_reshape_minor_factor_behind_size1_factor():
    fm = factor_map(OpView("reshape", ((2, 1, 3),), ((6,),), {"new_sizes": (6,)}))
    assert render(fm) == "abc->(abc)"
    assert splittable(fm) == "a"


def test_transpose():
    fm = fmap_of("transpose", lambda x: x.transpose(2, 0, 1), f32(2, 3, 4))
    assert render(fm) == "abc->cab"


def test_squeeze():
    fm = fmap_of("squeeze", lambda x: jnp.squeeze(x, 1), f32(6, 1))
    assert render(fm) == "ab->a"
    assert splittable(fm) == "a"


def test_iota():
    fm = fmap_of("iota", lambda: lax.broadcasted_iota(jnp.int32, (4, 8), 1))
    assert render(fm) == "->ab"
    assert fm.operands == ()


def test_gather_embedding_lookup():
    fm = fmap_of("gather", lambda t, i: jnp.take(t, i, axis=0), f32(32, 16), i32(4, 8))
    # table [V, D], indices [B, S, 1] -> [B, S, D]; a split V looks up local rows
    # (zero elsewhere) and sums: the vocabulary-parallel embedding
    assert render(fm) == "ab,cde->cdb reduce=a fixed=e"
    assert fm.factors[_factor(fm, "a")].size == 32
    assert splittable(fm) == "abcd"


def test_gather_along_axis1():
    fm = fmap_of("gather", lambda t, i: jnp.take(t, i, axis=1), f32(16, 32), i32(4))
    assert render(fm) == "ab,cd->ac reduce=b fixed=d"


def test_gather_with_batching_dims():
    fm = fmap_of("gather", jax.vmap(lambda t, i: t[i]), f32(4, 32, 16), i32(4))
    # the vmapped batch dim is shared; the indexed dims stay whole
    assert render(fm) == "abc,ad->aef fixed=bcdef"
    assert splittable(fm) == "a"


def _take_grad(t, i):
    return jax.grad(lambda t: jnp.take(t, i, axis=0).sum())(t)


def test_scatter_add_from_take_grad():
    fm = fmap_of("scatter-add", _take_grad, f32(32, 16), i32(4, 8))
    # operand [V, D], indices [B, S, 1], updates [B, S, D] -> [V, D]
    # each device adds the rows it holds (a vocabulary-parallel embedding's gradient)
    assert render(fm) == "ab,cde,cdb->ab reduce=cd fixed=e"
    assert splittable(fm) == "abcd"


def test_scatter_add_with_batching_dims_has_no_unused_factor():
    fm = fmap_of("scatter-add", jax.vmap(lambda t, i: t.at[i].add(1.0)), f32(4, 32, 16), i32(4))
    assert render(fm) == "abc,ad,ac->abc fixed=d"


def test_scatter_is_fixed_on_scattered_dims():
    fm = fmap_of("scatter", lambda t, i, u: t.at[i].set(u), f32(32, 16), i32(4), f32(4, 16))
    assert render(fm) == "ab,cd,cb->ab fixed=acd"


def test_concatenate():
    fm = fmap_of("concatenate", lambda x, y: jnp.concatenate([x, y], 1), f32(8, 16), f32(8, 4))
    assert render(fm) == "ab,ac->ad fixed=bcd"
    assert splittable(fm) == "a"


def test_split():
    fm = fmap_of("split", lambda x: jnp.split(x, 2, axis=1), f32(8, 16))
    assert render(fm) == "ab->ac,ad fixed=bcd"


def test_slice():
    fm = fmap_of("slice", lambda x: x[2:5], f32(8, 16))
    assert render(fm) == "ab->cb fixed=ac"


def test_dynamic_slice():
    fm = fmap_of("dynamic_slice", lambda x, i: lax.dynamic_slice(x, (i, 0), (2, 16)), f32(8, 16), 1)
    assert render(fm) == "ab,,->cb fixed=ac"


def test_dynamic_update_slice():
    fm = fmap_of(
        "dynamic_update_slice",
        lambda x, u, i: lax.dynamic_update_slice(x, u, (i, 0)),
        f32(8, 16),
        f32(2, 16),
        1,
    )
    assert render(fm) == "ab,cb,,->ab fixed=ac"


def test_pad():
    fm = fmap_of("pad", lambda x: jnp.pad(x, ((1, 1), (0, 0))), f32(8, 16))
    assert render(fm) == "ab,->cb fixed=ac"


def test_rev():
    fm = fmap_of("rev", lambda x: jnp.flip(x, 0), f32(8, 16))
    assert render(fm) == "ab->ab fixed=a"


def test_device_put_is_identity():
    fm = fmap_of("device_put", jax.device_put, f32(8, 16))
    assert render(fm) == "ab->ab"


# ---------------------------------------------------------------- control flow


def test_scan_carry_shares_factors():
    def fn(c, xs):
        return lax.scan(lambda c, x: (c + x, c * 2), c, xs)

    fm = fmap_of("scan", fn, f32(16), f32(5, 16))
    # carry in == carry out; scanned xs and stacked ys stay whole
    assert render(fm) == "a,bc->a,de fixed=bcde"


def test_scan_with_consts():
    def fn(w, c, xs):
        return lax.scan(lambda c, x: (c @ w + x, None), c, xs)[0]

    fm = fmap_of("scan", fn, f32(16, 16), f32(4, 16), f32(5, 4, 16))
    assert render(fm) == "ab,cd,efg->cd fixed=abefg"


def test_fori_loop_with_static_trip_count_is_scan():
    fm = fmap_of("scan", lambda x: lax.fori_loop(0, 3, lambda i, c: c * 2, x), f32(16))
    assert render(fm) == ",a->,a"


def test_while_with_consts():
    def fn(x, w, n):
        return lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] @ w), (0, x))

    v = view_of("while", fn, f32(8, 16), f32(16, 16), 3)
    assert (v.params["cond_nconsts"], v.params["body_nconsts"]) == (1, 1)
    assert render(factor_map(v)) == ",ab,,cd->,cd fixed=ab"


def test_fori_loop_with_traced_bounds_is_while():
    fm = fmap_of("while", lambda x, n: lax.fori_loop(0, n, lambda i, c: c * 2, x), f32(16), 3)
    assert render(fm) == ",,a->,,a"


def test_cond_keeps_everything_whole():
    fm = fmap_of(
        "cond", lambda p, x: lax.cond(p, lambda x: x + 1, lambda x: x - 1, x), True, f32(16)
    )
    assert render(fm) == ",a->b fixed=ab"
    assert splittable(fm) == ""


# ---------------------------------------------------------------- fallback and checks


def test_unknown_primitive_is_replicated_and_warns_once(monkeypatch):
    monkeypatch.setattr(core, "_warned", set())
    op = OpView("my_custom_op", ((8, 16), ()), ((8, 16),), {})
    with pytest.warns(UserWarning, match="my_custom_op") as record:
        fm = factor_map(op)
    assert len(record) == 1
    assert render(fm) == "ab,->cd fixed=abcd"
    assert fm == replicated_rule(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert factor_map(op) == fm  # second call: no warning
    with pytest.warns(UserWarning, match="another_custom_op"):
        factor_map(OpView("another_custom_op", ((4,),), ((4,),), {}))


def test_check_catches_wrong_rule(monkeypatch):
    def wrong(op):  # claims the output keeps the input's shape
        b = core.Builder()
        dims = tuple((b.new(d),) for d in op.in_shapes[0])
        return b.build([dims], [dims])

    monkeypatch.setitem(RULES, "my_wrong_op", wrong)
    with pytest.raises(AssertionError, match="my_wrong_op"):
        factor_map(OpView("my_wrong_op", ((8, 16),), ((16, 8),), {}))


def test_check_catches_wrong_arity():
    fm = FactorMap((Factor(8),), (((0,),),), ())
    with pytest.raises(ValueError):
        core.check(OpView("x", ((8,),), ((8,),), {}), fm)


def test_splittable_semantics():
    fm = FactorMap(
        (
            Factor(4),  # 0: major of a compound dim
            Factor(2),  # 1: minor of that dim
            Factor(1),  # 2: size 1
            Factor(8, FIXED),  # 3: fixed
            Factor(6, REDUCE),  # 4: reduce, alone
            Factor(3),  # 5: behind a size-1 factor: still the major non-unit factor
            Factor(5),  # 6: major in one dim, minor in another
            Factor(7),  # 7
        ),
        (((0, 1), (3,), (4,)), ((2, 5),)),
        (((6,), (7, 6)),),
    )
    assert fm.splittable() == (True, False, False, False, True, True, False, True)


def test_every_rule_output_matches_shapes_on_real_programs():
    """A sweep of real equations: every factor map passes check, and every factor is used."""
    programs = [
        (lambda x, y: jnp.tanh(x @ y).sum(), f32(8, 16), f32(16, 4)),
        (lambda x: jax.nn.softmax(x, axis=-1), f32(4, 8)),
        (lambda x: jnp.cumsum(jnp.sort(x, 0), 1)[::2], f32(8, 6)),
    ]
    for fn, *args in programs:
        for v in views(fn, *args):
            fm = factor_map(v)
            used = {f for dims in (*fm.operands, *fm.outputs) for d in dims for f in d}
            assert used == set(range(len(fm.factors))), (v.primitive, render(fm))


# ---------------------------------------------------------------- coverage of the models


def _primitives(jaxpr, acc: set[str]) -> set[str]:
    for eqn in jaxpr.eqns:
        acc.add(eqn.primitive.name)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            _primitives(sub, acc)
    return acc


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_reference_models_use_only_primitives_with_rules(name):
    from autoshard.models import gpt, mlp

    module = {"mlp": mlp, "gpt": gpt}[name]
    s = module.setup(module.tiny(), 8)
    jaxpr = jax.make_jaxpr(s.train_step)(s.state, s.batch).jaxpr
    prims = _primitives(jaxpr, set())
    assert "dot_general" in prims
    missing = sorted(p for p in prims if not has_rule(p) and p not in jax_core.INLINE_BODY_PARAM)
    assert missing == []
