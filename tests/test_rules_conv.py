"""Factor rules of convolutions and windowed reductions, on real jaxpr equations.

Rendering as in test_rules.py: letters name factors by first appearance, ``(..)`` is
a compound dimension, ``_`` a dimension without factor. NHWC/HWIO unless noted.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax import lax
from test_rules import f32, fmap_of, render, splittable, view_of, views
from util import assert_close, assert_prediction_matches, compiled_vs_predicted, run_both, spec_of

import autoshard
from autoshard.passes.rules import FIXED, REDUCE, factor_map
from autoshard.passes.strategies import op_flops

NHWC = ("NHWC", "HWIO", "NHWC")


def conv(x, w, stride=1, padding="SAME", groups=1, dn=NHWC):
    return lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=dn, feature_group_count=groups
    )


def conv_grads(x, w, **kw):
    """The forward conv, the input gradient and the kernel gradient of one conv."""
    fn = jax.grad(lambda x, w: jnp.sum(conv(x, w, **kw) ** 2), (0, 1))
    fwd, *grads = [v for v in views(fn, x, w) if v.primitive == "conv_general_dilated"]
    (dx,) = [v for v in grads if v.out_shapes == (x.shape,)]
    (dw,) = [v for v in grads if v.out_shapes == (w.shape,)]
    return fwd, dx, dw


def flops(v) -> float:
    return op_flops(v.primitive, factor_map(v), None)


def reduce_sizes(fm) -> list[int]:
    return [f.size for f in fm.factors if f.kind == REDUCE]


# ---------------------------------------------------------------- conv_general_dilated


def test_forward_conv_contracts_input_features():
    fwd, dx, dw = conv_grads(f32(8, 16, 16, 4), f32(3, 3, 4, 6))
    fm = factor_map(fwd)
    # lhs n h w c, rhs kh kw c o -> n h w o: spatial dims stay whole
    assert render(fm) == "abcd,efdg->abcg reduce=d fixed=bcef"
    assert splittable(fm) == "adg"  # batch, input channels, output channels
    assert flops(fwd) == 2 * 8 * 16 * 16 * 4 * 6 * 3 * 3  # exact: H reuses the out factor


def test_input_gradient_contracts_output_features():
    _, dx, _ = conv_grads(f32(8, 16, 16, 4), f32(3, 3, 4, 6))
    fm = factor_map(dx)
    assert dx.in_shapes == ((8, 16, 16, 6), (3, 3, 4, 6))
    assert render(fm) == "abcd,efgd->abcg reduce=d fixed=bcef"
    assert reduce_sizes(fm) == [6]
    assert flops(dx) == 2 * 8 * 16 * 16 * 4 * 6 * 3 * 3


def test_kernel_gradient_contracts_the_batch():
    _, _, dw = conv_grads(f32(8, 16, 16, 4), f32(3, 3, 4, 6))
    fm = factor_map(dw)
    # x [n h w c] and dy [n h w o] -> dw [kh kw c o]: the batch is the summed dim
    assert dw.out_shapes == ((3, 3, 4, 6),)
    assert render(fm) == "abcd,abce->fgde reduce=a fixed=bcfg"
    assert reduce_sizes(fm) == [8]
    assert splittable(fm) == "ade"
    assert flops(dw) == 2 * 8 * 16 * 16 * 4 * 6 * 3 * 3


def test_1x1_conv_spatial_dims_pass():
    fwd, dx, dw = conv_grads(f32(8, 16, 16, 4), f32(1, 1, 4, 6))
    assert render(factor_map(fwd)) == "abcd,__de->abce reduce=d"
    assert splittable(factor_map(fwd)) == "abcde"
    assert render(factor_map(dx)) == "abcd,__ed->abce reduce=d"
    # the kernel gradient's window is the whole image: kept whole
    assert render(factor_map(dw)) == "abcd,abce->fgde reduce=a fixed=bcfg"


def test_strided_conv_and_its_gradients():
    fwd, dx, dw = conv_grads(f32(8, 16, 16, 4), f32(3, 3, 4, 6), stride=2)
    assert render(factor_map(fwd)) == "a(bc)(de)f,ghfi->abdi reduce=f fixed=bcdegh"
    exact = 2 * 8 * 8 * 8 * 4 * 6 * 3 * 3
    assert flops(fwd) == 4 * exact  # within the stride's factor per spatial dim
    assert dx.params["lhs_dilation"] == (2, 2)
    assert render(factor_map(dx)) == "abcd,efgd->a(bh)(ci)g reduce=d fixed=bcefhi"
    assert flops(dx) == 2 * 8 * 16 * 16 * 4 * 6 * 3 * 3  # XLA counts the dilated input
    assert render(factor_map(dw)) == "a(bc)(de)f,abdg->hifg reduce=a fixed=bcdehi"


def test_strided_1x1_conv_is_not_pointwise():
    fwd, _, _ = conv_grads(f32(8, 8, 8, 4), f32(1, 1, 4, 6), stride=2)
    assert render(factor_map(fwd)) == "a(bc)(de)f,ghfi->abdi reduce=f fixed=bcdegh"


def test_nchw_oihw_dimension_numbers():
    x, w = f32(8, 4, 10, 10), f32(6, 4, 3, 3)
    v = view_of("conv_general_dilated", lambda x, w: lax.conv(x, w, (1, 1), "VALID"), x, w)
    fm = factor_map(v)
    # lhs n c h w, rhs o c kh kw -> n o h' w'
    assert render(fm) == "abcd,ebfg->aehi reduce=b fixed=cdfghi"
    assert splittable(fm) == "abe"
    assert [fm.factors[f[0]].size for f in fm.outputs[0]] == [8, 6, 8, 8]


def test_feature_groups_keep_features_whole():
    fwd, dx, dw = conv_grads(f32(8, 16, 16, 4), f32(3, 3, 2, 6), groups=2)
    assert fwd.params["feature_group_count"] == 2
    fm = factor_map(fwd)
    # lhs features = (group, c/group); output features = (group, o/group)
    assert render(fm) == "abc(de),fge(dh)->abc(dh) fixed=bcdefgh"
    assert splittable(fm) == "a"
    assert flops(fwd) == 2 * 8 * 16 * 16 * 2 * 6 * 3 * 3
    assert dx.params["feature_group_count"] == 2
    assert splittable(factor_map(dx)) == "a"


def test_batch_groups_from_grouped_kernel_gradient():
    _, _, dw = conv_grads(f32(8, 16, 16, 4), f32(3, 3, 2, 6), groups=2)
    assert dw.params["batch_group_count"] == 2
    fm = factor_map(dw)
    # lhs "batch" (x's channels) = (group, c/group); out features = (group, o/group)
    assert render(fm) == "abc(de),abc(df)->ghe(df) reduce=a fixed=bcdefgh"
    assert splittable(fm) == "a"  # x's batch, contracted


def test_every_factor_is_used_and_shapes_check():
    for v in conv_grads(f32(4, 9, 7, 3), f32(3, 2, 3, 5), stride=2, padding="VALID"):
        fm = factor_map(v)  # factor_map runs core.check on the shapes
        used = {f for dims in (*fm.operands, *fm.outputs) for d in dims for f in d}
        assert all(f in used or fm.factors[f].kind == FIXED for f in range(len(fm.factors)))


# ---------------------------------------------------------------- pooling


def test_max_pool_window_dims_fixed():
    fm = fmap_of("reduce_window_max", lambda x: nnx.max_pool(x, (2, 2), (2, 2)), f32(8, 16, 16, 4))
    assert render(fm) == "abcd->aefd fixed=bcef"
    assert splittable(fm) == "ad"


def test_avg_pool_is_reduce_window_sum():
    fm = fmap_of("reduce_window_sum", lambda x: nnx.avg_pool(x, (3, 3)), f32(8, 16, 16, 4))
    assert render(fm) == "abcd->aefd fixed=bcef"


def test_window_of_one_with_stride_one_passes():
    fm = fmap_of(
        "reduce_window_max",
        lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 1, 1), (1, 2, 1, 1), "VALID"),
        f32(8, 16, 16, 4),
    )
    assert render(fm) == "abcd->aecd fixed=be"
    assert splittable(fm) == "acd"


def test_generic_reduce_window():
    fm = fmap_of(
        "reduce_window",
        lambda x: lax.reduce_window(x, 1.0, lax.mul, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        f32(8, 16, 16, 4),
    )
    assert render(fm) == "abcd,->aefd fixed=bcef"


def test_max_pool_gradient_is_select_and_scatter_add():
    fn = jax.grad(lambda x: jnp.sum(nnx.max_pool(x, (3, 3), (2, 2), "SAME") ** 2))
    fm = fmap_of("select_and_scatter_add", fn, f32(8, 16, 16, 4))
    # source [pooled], operand [x] -> [x]
    assert render(fm) == "abcd,aefd->aefd fixed=bcef"
    assert splittable(fm) == "ad"


def test_max_pool_jvp_is_select_and_gather_add():
    def fn(x, t):
        return jax.jvp(lambda x: nnx.max_pool(x, (2, 2), (2, 2)), (x,), (t,))

    fm = fmap_of("select_and_gather_add", fn, f32(8, 16, 16, 4), f32(8, 16, 16, 4))
    assert render(fm) == "abcd,abcd->aefd fixed=bcef"


# ---------------------------------------------------------------- sharded == single device


def conv_net_step(params, batch):
    """A strided conv, max and average pooling, a 1x1 conv and a dense head; SGD."""

    def loss_fn(p):
        h = jax.nn.relu(conv(batch["x"], p["c1"], stride=2))
        h = nnx.max_pool(h, (3, 3), (1, 1), "SAME")
        h = conv(nnx.avg_pool(h, (2, 2), (2, 2)), p["c2"])
        return jnp.mean((h.mean(axis=(1, 2)) @ p["out"] - batch["y"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    return optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, g)), loss


def _conv_net(batch_size, image, c1, c2):
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "c1": jax.random.normal(k[0], (3, 3, 3, c1)) / 5,
        "c2": jax.random.normal(k[1], (1, 1, c1, c2)) / 4,
        "out": jax.random.normal(k[2], (c2, 4)) / 6,
    }
    x = jax.random.normal(k[3], (batch_size, image, image, 3))
    return params, {"x": x, "y": jax.random.normal(k[4], (batch_size, 4))}


# (conv net, expected specs of c1, c2 and the images). On many images: data parallel.
# On 2 images with wide layers: c1 split by output channels and c2 by input channels
# (Megatron's column/row pairing), leaving one activation all-reduce.
CASES = {
    "data": ((16, 16, 16, 32), (), (), ("all",)),
    "channels": ((2, 8, 256, 512), (None, None, None, "all"), (None, None, "all"), ()),
}


@pytest.mark.parametrize("mesh", [(8,), (2, 4)], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_net_step_plan_and_numerics(case, mesh):
    sizes, c1_spec, c2_spec, x_spec = CASES[case]
    params, batch = _conv_net(*sizes)
    hw = autoshard.PRESETS["cpu"]
    out, ref, step = run_both(conv_net_step, params, batch, mesh=mesh, hardware=hw)
    assert_close(out, ref, atol=2e-6)
    plan = step.plan(params, batch)
    names = plan.mesh.axis_names
    every = names[0] if len(names) == 1 else tuple(names)  # "all": split over all 8
    expand = lambda spec: tuple(every if d == "all" else d for d in spec)
    assert spec_of(plan, "['c1']") == expand(c1_spec)
    assert spec_of(plan, "['c2']") == expand(c2_spec)
    assert spec_of(plan, "batch['x']") == expand(x_spec)
    compiled, _ = compiled_vs_predicted(step, params, batch)
    assert set(compiled) == {"all-reduce"} and compiled["all-reduce"][0] == 1
    assert_prediction_matches(step, params, batch)
