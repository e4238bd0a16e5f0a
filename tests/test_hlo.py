"""Reading collectives from compiled HLO: real programs on a (2, 4) CPU mesh, then snippets.

Expected bytes are per device and worked out from the shapes in each test.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autoshard import hlo
from autoshard.hlo import Collective, collectives, parse_collectives

F32 = 4
ROWS = ((0, 1, 2, 3), (4, 5, 6, 7))  # groups along "model" on the (2, 4) mesh
COLS = ((0, 4), (1, 5), (2, 6), (3, 7))  # groups along "data"
ALL = (tuple(range(8)),)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def put(mesh, shape, *spec, dtype=jnp.float32):
    return jax.device_put(jnp.ones(shape, dtype), NamedSharding(mesh, P(*spec)))


def compile_(f, *args):
    return jax.jit(f).lower(*args).compile()


def only(compiled) -> Collective:
    (c,) = parse_collectives(compiled.as_text())
    return c


def constrain(mesh, *spec):
    return lambda a: jax.lax.with_sharding_constraint(a * 2, NamedSharding(mesh, P(*spec)))


# ---------------------------------------------------------------------------- real programs


def mlp_step(p, x, y):
    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    return jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p))


@pytest.mark.parametrize(
    "batch_axes, groups", [(("data", "model"), ALL), ("data", COLS)], ids=["dp8", "dp2"]
)
def test_data_parallel_grads_are_one_fused_all_reduce(mesh, batch_axes, groups):
    shapes = {"w1": (16, 32), "b1": (32,), "w2": (32, 4), "b2": (4,)}
    params = {k: put(mesh, s) for k, s in shapes.items()}
    x, y = put(mesh, (64, 16), batch_axes), put(mesh, (64, 4), batch_axes)
    compiled = compile_(mlp_step, params, x, y)
    grad_bytes = (16 * 32 + 32 + 32 * 4 + 4) * F32  # every gradient, in one tuple
    c = only(compiled)
    expected = ("all-reduce", grad_bytes, groups, 8 // len(groups))
    assert (c.kind, c.bytes, c.groups, c.group_size) == expected
    assert collectives(compiled) == {"all-reduce": (1, grad_bytes)}


def test_megatron_pair_is_one_all_reduce_over_model(mesh):
    x = put(mesh, (8, 16))
    w1, w2 = put(mesh, (16, 32), None, "model"), put(mesh, (32, 24), "model", None)
    c = only(compile_(lambda x, a, b: x @ a @ b, x, w1, w2))
    # Each device holds a partial [8, 24] sum of x @ w1[:, cols] @ w2[cols, :].
    assert (c.kind, c.bytes, c.group_size, c.groups) == ("all-reduce", 8 * 24 * F32, 4, ROWS)


def test_constraint_to_replicated_is_an_all_gather(mesh):
    c = only(compile_(constrain(mesh), put(mesh, (16, 8), "data", None)))
    assert (c.kind, c.bytes, c.group_size, c.groups) == ("all-gather", 16 * 8 * F32, 2, COLS)


@pytest.mark.parametrize(
    "axis, n, groups", [("model", 4, ROWS), ("data", 2, COLS)], ids=["model", "data"]
)
def test_moving_the_split_dim_is_an_all_to_all(mesh, axis, n, groups):
    compiled = compile_(constrain(mesh, None, axis), put(mesh, (16, 8), axis, None))
    c = only(compiled)  # [16/n, 8] -> [16, 8/n]; XLA prints a tuple of n [16/n, 1, 8/n] pieces
    assert (c.kind, c.bytes, c.group_size, c.groups) == ("all-to-all", 16 * 8 // n * F32, n, groups)


def test_sharded_contraction_with_split_output_is_all_reduce_not_reduce_scatter(mesh):
    # XLA on CPU reduces the whole partial [8, 32] and slices it: no reduce-scatter.
    x, w = put(mesh, (8, 16), None, "model"), put(mesh, (16, 32), "model", None)
    for out_spec in [(None, "model"), ("model", None)]:
        compiled = compile_(lambda x, w, s=out_spec: constrain(mesh, *s)(x @ w), x, w)
        assert collectives(compiled) == {"all-reduce": (1, 8 * 32 * F32)}
        assert only(compiled).groups == ROWS


def shard_mapped(mesh, f, in_spec, out_spec):
    return jax.shard_map(f, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False)


def test_psum_scatter_is_reduce_scatter_sized_by_its_operand(mesh):
    rs = lambda a: jax.lax.psum_scatter(a, "model", scatter_dimension=0, tiled=True)
    f = shard_mapped(mesh, rs, P("data", None), P("data", "model"))
    c = only(compile_(f, put(mesh, (8, 8))))
    # Operand [4, 8] per device (its type is found from the parameter that defines it).
    assert (c.kind, c.bytes, c.group_size, c.groups) == ("reduce-scatter", 4 * 8 * F32, 4, ROWS)


def test_ppermute_is_a_collective_permute_with_its_pairs(mesh):
    ring = [(i, (i + 1) % 4) for i in range(4)]
    f = shard_mapped(
        mesh, lambda a: jax.lax.ppermute(a, "model", ring), P("data", "model"), P("data", "model")
    )
    c = only(compile_(f, put(mesh, (8, 8))))
    pairs = tuple((i + 4 * r, (i + 1) % 4 + 4 * r) for r in range(2) for i in range(4))
    expected = ("collective-permute", 4 * 2 * F32, 2, pairs)
    assert (c.kind, c.bytes, c.group_size, c.groups) == expected


def test_collective_in_a_loop_body_is_printed_once_in_the_body(mesh):
    body = shard_mapped(
        mesh, lambda b: jax.lax.psum(b, "data") * 0.5, P("data", "model"), P("data", "model")
    )
    compiled = compile_(
        lambda a: jax.lax.fori_loop(0, 3, lambda i, v: body(v * 2), a), put(mesh, (8, 8))
    )
    c = only(compiled)
    assert (c.kind, c.bytes, c.groups) == ("all-reduce", 4 * 2 * F32, COLS)
    entry = next(line for line in compiled.as_text().splitlines() if line.startswith("ENTRY"))
    assert c.computation not in entry  # in the while body, not the entry


def test_iota_groups_from_a_real_program(mesh):
    # P(("model", "data")) -> P("data"): a permute into place, then an all-gather whose
    # groups XLA prints as [2,4]<=[8].
    compiled = compile_(constrain(mesh, "data", None), put(mesh, (16, 8), ("model", "data")))
    assert "replica_groups=[2,4]<=[8]" in compiled.as_text()
    assert collectives(compiled) == {
        "collective-permute": (1, 2 * 8 * F32),
        "all-gather": (1, 8 * 8 * F32),
    }
    ag = next(c for c in parse_collectives(compiled.as_text()) if c.kind == "all-gather")
    assert ag.groups == ROWS


def test_cpu_moves_bf16_collectives_as_f32(mesh):
    # XLA on CPU widens bf16 collectives to f32: the HLO moves twice the bf16 bytes.
    x = put(mesh, (16, 8), "data", None, dtype=jnp.bfloat16)
    assert collectives(compile_(constrain(mesh), x)) == {"all-gather": (1, 16 * 8 * F32)}


def test_no_collectives_when_nothing_moves(mesh):
    assert collectives(compile_(lambda a: a * 2, put(mesh, (16, 8), "data", "model"))) == {}


# ---------------------------------------------------------------------------- HLO snippets


def module(*lines, partitions=8):
    header = "HloModule m" + (f", num_partitions={partitions}" if partitions else "")
    add = (
        "%add (x: f32[], y: f32[]) -> f32[] {\n  %x = f32[] parameter(0)\n"
        "  %y = f32[] parameter(1)\n  ROOT %all-reduce.0 = f32[] add(%x, %y)\n}"
    )
    body = "\n".join("  " + line for line in lines)
    return (
        f"{header}\n\n{add}\n\nENTRY %main (p: f32[8,16]) -> f32[8,16] {{\n"
        f"  %p = f32[8,16]{{1,0}} parameter(0)\n{body}\n}}\n"
    )


def one(*lines, partitions=8) -> Collective:
    (c,) = parse_collectives(module(*lines, partitions=partitions))
    return c


def groups_of(replica_groups: str, partitions=8):
    c = one(
        f"ROOT %ar = f32[8,16]{{1,0}} all-reduce(%p), replica_groups={replica_groups}, "
        "use_global_device_ids=true, to_apply=%add",
        partitions=partitions,
    )
    return c.groups, c.group_size


@pytest.mark.parametrize(
    "text, groups",
    [
        ("{{0,1,2,3},{4,5,6,7}}", ROWS),
        ("{{0,4},{1,5},{2,6},{3,7}}", COLS),
        ("[2,4]<=[8]", ROWS),
        ("[4,2]<=[2,4]T(1,0)", COLS),
        ("[1,8]<=[8]", ALL),
        ("mesh['a'=2,'b'=4] {'a'}", COLS),
        ("mesh['a'=2,'b'=4] {'b'}", ROWS),
        ("mesh['a'=2,'b'=4] {'a','b'}", ALL),
        ("mesh['a'=2,'b'=4] {'b','a'}", ((0, 4, 1, 5, 2, 6, 3, 7),)),
        ("mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}", ROWS),
        (
            "mesh['axis_0'=4,'axis_1'=2], device_ids=([4,2]T(1,0)) {'axis_0'}",
            ((0, 4, 1, 5), (2, 6, 3, 7)),
        ),
        ("mesh['a'=8] {'a':(1)2}", COLS),  # the major factor 2 of a
        ("mesh['a'=8] {'a':(2)4}", ROWS),  # the minor factor 4
        ("mesh['a'=8] {'a':(4)2}", ((0, 1), (2, 3), (4, 5), (6, 7))),
        ("mesh[a=2,b=4] {b}", ROWS),
        ("mesh['a'=2,'b'=2], device_ids=(3,1,2,0) {'b'}", ((3, 1), (2, 0))),
    ],
)
def test_replica_group_syntaxes(text, groups):
    assert groups_of(text) == (groups, len(groups[0]))


def test_mesh_with_no_axes_is_groups_of_one():
    assert groups_of("mesh['a'=2,'b'=4] {}") == (tuple((i,) for i in range(8)), 1)


def test_empty_groups_mean_all_devices_from_num_partitions():
    assert groups_of("{}") == (ALL, 8)
    assert groups_of("{}", partitions=None) == ((), 0)


@pytest.mark.parametrize(
    "text", ["[2,4]<~[8]", "mesh['a'=2] {'zz'}", "mesh['a'=3], device_ids=(1,2) {'a'}"]
)
def test_unknown_group_syntax_is_size_zero_not_an_error(text):
    assert groups_of(text) == ((), 0)


def test_tuple_all_reduce_sums_its_elements_and_skips_reducers():
    text = module(
        "%q = f32[4,4]{1,0} parameter(1)",
        "%ar = (f32[16]{0}, f32[4,4]{1,0}, bf16[3]{0}, f32[]) all-reduce(f32[16]{0} %p, "
        "f32[4,4]{1,0} %q, bf16[3]{0} %r, f32[] %s), channel_id=1, "
        'replica_groups={{0,1}}, to_apply=%add, metadata={op_name="all-reduce(x)"}',
    )
    (c,) = parse_collectives(text)  # the reducer's "%all-reduce.0 = add" is not one
    assert (c.name, c.bytes, c.computation) == ("ar", (16 + 16) * F32 + 3 * 2 + F32, "main")
    assert collectives(text) == {"all-reduce": (1, 138)}


@pytest.mark.parametrize(
    "hlo_type, expected",
    [
        ("f32[]", 4),
        ("f64[2,3]{1,0}", 48),
        ("bf16[10]", 20),
        ("f16[10]", 20),
        ("s8[7]", 7),
        ("u8[7]", 7),
        ("pred[5]", 5),
        ("s16[3]", 6),
        ("s32[3]", 12),
        ("s64[3]", 24),
        ("u32[3]", 12),
        ("s4[3]", 2),
        ("f8e4m3fn[4]", 4),
        ("c64[2]", 16),
        ("(f32[2], s32[])", 12),
        ("token[]", 0),
    ],
)
def test_dtype_sizes(hlo_type, expected):
    assert hlo._type_bytes(hlo_type) == expected


def test_reduce_scatter_bytes_are_its_operand():
    def rs(operand):
        return one(
            f"%rs = f32[2,16]{{1,0}} reduce-scatter({operand}), "
            "replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add"
        )

    # Operand type found from the instruction that defines %p: f32[8,16].
    assert rs("%p").bytes == 8 * 16 * F32
    assert rs("f32[8,16]{1,0} %p").bytes == 8 * 16 * F32
    # Unknown operand: result bytes times the group size.
    assert rs("%nowhere").bytes == 2 * 16 * F32 * 4


def test_async_pairs_count_once_with_the_data_bytes():
    text = module(
        "%ars = f32[8,16]{1,0} all-reduce-start(%p), replica_groups={{0,1}}, to_apply=%add",
        "%ard = f32[8,16]{1,0} all-reduce-done(%ars)",
        "%ags = (f32[8,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%ard), "
        "replica_groups=[2,4]<=[8], dimensions={0}",
        "%agd = f32[32,16]{1,0} all-gather-done((f32[8,16]{1,0}, f32[32,16]{1,0}) %ags)",
        "%cps = (f32[32,16]{1,0}, f32[32,16]{1,0}, u32[], u32[]) collective-permute-start(%agd), "
        "source_target_pairs={{0,1},{1,0}}",
        "ROOT %cpd = f32[32,16]{1,0} collective-permute-done(%cps)",
    )
    assert [(c.kind, c.name, c.bytes, c.group_size) for c in parse_collectives(text)] == [
        ("all-reduce", "ars", 512, 2),
        ("all-gather", "ags", 2048, 4),
        ("collective-permute", "cps", 2048, 2),
    ]


def test_async_start_without_done_takes_the_result_half():
    c = one(
        "%ags = (f32[8,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%p), "
        "replica_groups={{0,1,2,3}}, dimensions={0}"
    )
    assert (c.kind, c.bytes) == ("all-gather", 32 * 16 * F32)


def test_collectives_in_other_computations_keep_their_computation():
    text = module("ROOT %w = (s32[], f32[8,16]) while(%t), condition=%cond, body=%body")
    text += (
        "\n%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {\n"
        "  %v = f32[4]{0} parameter(0)\n"
        "  ROOT %a2a = f32[4]{0} all-to-all(%v), replica_groups={{0,1}}, dimensions={0}\n}\n"
    )
    (c,) = parse_collectives(text)
    assert (c.kind, c.computation, c.bytes) == ("all-to-all", "body", 16)


def test_names_without_percent_signs():
    text = (
        "HloModule m, num_partitions=2\n\nENTRY main {\n  p = f32[4]{0} parameter(0)\n"
        "  ROOT ag = f32[8]{0} all-gather(p), replica_groups={{0,1}}, dimensions={0}\n}\n"
    )
    assert parse_collectives(text) == [Collective("all-gather", 32, 2, ((0, 1),), "ag", "main")]


def test_docstring_examples_run():
    assert doctest.testmod(hlo).failed == 0
