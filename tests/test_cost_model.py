"""The cost model as plain numbers: collectives, resharding, memory, the ILP, strategies."""

import numpy as np
import pytest

from autoshard.cost_model import collectives as coll
from autoshard.cost_model import ilp
from autoshard.cost_model.collectives import (
    ALL_GATHER,
    ALL_REDUCE,
    ALL_TO_ALL,
    REDUCE_SCATTER,
    Collective,
)
from autoshard.cost_model.compute import compute_time
from autoshard.cost_model.hardware import PRESETS, Hardware, MeshDesc
from autoshard.cost_model.memory import live_peak
from autoshard.cost_model.resharding import per_device_bytes, placement, reshard
from autoshard.passes.rules import REDUCE, OpView, factor_map
from autoshard.passes.strategies import (
    OpInfo,
    enumerate_strategies,
    source_strategies,
    spec_str,
)

MESH = MeshDesc((2, 4), ("x", "y"))
# Axis 0 is slow with low latency, axis 1 fast with high latency, so the slowest
# bandwidth and the largest latency come from different axes.
HW = Hardware(flops=1e12, bandwidth=(1e9, 4e9), latency=(1e-6, 2e-6), name="test")
B = 4096.0

# ---------------------------------------------------------------- collectives


def test_all_reduce_ring_time():
    t = coll.time(Collective(ALL_REDUCE, (1,), B), MESH, HW)
    assert t == pytest.approx(2e-6 + 2 * 3 / 4 * B / 4e9)


def test_all_gather_over_both_axes_uses_slowest_bandwidth_and_largest_latency():
    t = coll.time(Collective(ALL_GATHER, (0, 1), B), MESH, HW)
    assert t == pytest.approx(2e-6 + 7 / 8 * B / 1e9)


def test_reduce_scatter_time():
    t = coll.time(Collective(REDUCE_SCATTER, (0,), B), MESH, HW)
    assert t == pytest.approx(1e-6 + 1 / 2 * B / 1e9)


def test_all_to_all_time():
    t = coll.time(Collective(ALL_TO_ALL, (1,), B), MESH, HW)
    assert t == pytest.approx(2e-6 + 3 / 4 * B / 4e9)


def test_all_reduce_costs_twice_the_bandwidth_term_of_all_gather():
    hw = Hardware(flops=1e12, bandwidth=1e9, latency=0.0)
    ar = coll.time(Collective(ALL_REDUCE, (0, 1), B), MESH, hw)
    ag = coll.time(Collective(ALL_GATHER, (0, 1), B), MESH, hw)
    assert ar == pytest.approx(2 * ag)
    assert ag == pytest.approx(7 / 8 * B / 1e9)


def test_uniform_hardware_scalar_numbers():
    hw = Hardware(flops=1e12, bandwidth=2e9, latency=3e-6)
    t = coll.time(Collective(ALL_REDUCE, (0,), B), MESH, hw)
    assert t == pytest.approx(3e-6 + 2 * 1 / 2 * B / 2e9)


@pytest.mark.parametrize(
    ("mesh", "axes", "nbytes"),
    [(MeshDesc((1, 8), ("x", "y")), (0,), B), (MESH, (), B), (MESH, (0, 1), 0.0)],
    ids=["size1-axis", "no-axes", "zero-bytes"],
)
def test_trivial_collectives_are_free(mesh, axes, nbytes):
    for kind in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL):
        assert coll.time(Collective(kind, axes, nbytes), mesh, HW) == 0.0


def test_total_time_sums():
    cs = [Collective(ALL_REDUCE, (1,), B), Collective(ALL_GATHER, (0,), B)]
    expected = coll.time(cs[0], MESH, HW) + coll.time(cs[1], MESH, HW)
    assert coll.total_time(cs, MESH, HW) == pytest.approx(expected)
    assert coll.total_time([], MESH, HW) == 0.0


# ---------------------------------------------------------------- hardware


def test_hardware_per_axis_lookup():
    assert HW.axis_bandwidth(1) == 4e9
    assert HW.axis_latency(0) == 1e-6
    assert HW.per_axis_count() == 2
    assert Hardware(flops=1.0, bandwidth=1e9).per_axis_count() is None
    assert Hardware(flops=1.0, bandwidth=1e9, latency=(1.0, 2.0, 3.0)).per_axis_count() == 3


def test_hardware_per_axis_too_short_is_a_clear_error():
    hw = Hardware(flops=1e12, bandwidth=(1e9,), name="short")
    assert hw.axis_bandwidth(0) == 1e9
    with pytest.raises(ValueError, match="'short' gives 1 per-axis values .* axis 1"):
        hw.axis_bandwidth(1)
    with pytest.raises(ValueError, match="axis 1"):
        coll.time(Collective(ALL_GATHER, (0, 1), B), MESH, hw)
    with pytest.raises(ValueError, match="axis 2"):
        Hardware(flops=1.0, bandwidth=1e9, latency=[1e-6, 1e-6]).axis_latency(2)


def test_hardware_with_and_presets():
    hw = PRESETS["cpu"].with_(bandwidth=1.0)
    assert hw.bandwidth == 1.0 and hw.flops == PRESETS["cpu"].flops
    assert PRESETS["cpu"].reduce_scatter is False
    assert PRESETS["tpu-v4"].reduce_scatter is True


def test_mesh_desc():
    assert MESH.size == 8
    assert MESH.group((0,)) == 2 and MESH.group((0, 1)) == 8 and MESH.group(()) == 1


def test_compute_time_is_a_roofline():
    hw = Hardware(flops=1e12, bandwidth=1e9, memory_bandwidth=1e11)
    assert compute_time(2e12, 1e9, hw) == pytest.approx(2.0)  # compute bound
    assert compute_time(1e9, 1e11, hw) == pytest.approx(1.0)  # memory bound


# ---------------------------------------------------------------- resharding

N = 1024.0  # global bytes


def test_reshard_same_spec_is_free():
    assert reshard(((0,), (1,)), ((0,), (1,)), N, MESH) == ()


def test_reshard_replicated_to_split_is_a_local_slice():
    assert reshard(((), ()), ((0,), (1,)), N, MESH) == ()
    assert reshard(((0,), ()), ((0,), (1,)), N, MESH) == ()


def test_reshard_split_to_replicated_gathers_to_the_result():
    assert reshard(((0,), ()), ((), ()), N, MESH) == (Collective(ALL_GATHER, (0,), N),)
    # axes on two dimensions: gathered one dimension at a time, minor first
    assert reshard(((0,), (1,)), ((), ()), N, MESH) == (
        Collective(ALL_GATHER, (1,), N / 2),
        Collective(ALL_GATHER, (0,), N),
    )


def test_reshard_dropping_one_of_two_axes_gathers_to_the_kept_split():
    # ((0,), (1,)) -> ((0,), ()): the result is split 2-ways, N/2 per device
    assert reshard(((0,), (1,)), ((0,), ()), N, MESH) == (Collective(ALL_GATHER, (1,), N / 2),)
    # ((0, 1), ()) -> ((0,), ()): same bytes, the minor axis is dropped
    assert reshard(((0, 1), ()), ((0,), ()), N, MESH) == (Collective(ALL_GATHER, (1,), N / 2),)


def test_reshard_moving_an_axis_between_dims_is_an_all_to_all():
    assert reshard(((0,), ()), ((), (0,)), N, MESH) == (Collective(ALL_TO_ALL, (0,), N / 2),)
    # a swap of two dimensions: all-to-all plus a permute (measured on XLA CPU)
    assert reshard(((0,), (1,)), ((1,), (0,)), N, MESH) == (
        Collective(ALL_TO_ALL, (0, 1), N / 8),
        Collective("collective-permute", (0, 1), N / 8),
    )


def test_reshard_reordering_axes_on_one_dim_is_an_all_to_all():
    assert reshard(((0, 1), ()), ((1, 0), ()), N, MESH) == (Collective(ALL_TO_ALL, (0, 1), N / 8),)


def test_reshard_move_and_drop_mixed():
    # axis 1 moves dim 1 -> dim 0 (all-to-all on the source layout), axis 0 is dropped
    # (all-gather into the destination layout, split 4-ways)
    assert reshard(((0,), (1,)), ((1,), ()), N, MESH) == (
        Collective(ALL_TO_ALL, (1,), N / 8),
        Collective(ALL_GATHER, (0,), N / 4),
    )


def test_reshard_over_size1_axis_is_free():
    mesh = MeshDesc((1, 8), ("x", "y"))
    assert reshard(((0,), ()), ((), ()), N, mesh) == ()
    assert reshard(((0,), ()), ((), (0,)), N, mesh) == ()


def test_placement_and_per_device_bytes():
    assert placement(((0, 1), ())) == {0: (0, ()), 1: (0, (0,))}
    assert per_device_bytes(N, ((0,), (1,)), MESH) == N / 8
    assert per_device_bytes(N, ((), ()), MESH) == N


# ---------------------------------------------------------------- memory


def test_live_peak_chain():
    # value 0 is an argument; ops: 0 -> 1 -> 2 -> 3, value 3 is kept
    produced = [[1], [2], [3]]
    consumed = [[0], [1], [2]]
    nbytes = [1000.0, 10.0, 20.0, 30.0]
    # live after each op's outputs: 10; 10+20; 20+30 (arguments never count)
    assert live_peak(produced, consumed, nbytes, keep={3}) == 50.0


def test_live_peak_branch_keeps_value_until_last_reader():
    # 1 = f(0); 2 = g(1); 3 = h(1, 2); value 1 lives through op 2
    produced = [[1], [2], [3]]
    consumed = [[0], [1], [1, 2]]
    nbytes = [0.0, 100.0, 1.0, 5.0]
    assert live_peak(produced, consumed, nbytes, keep={3}) == 106.0


def test_live_peak_unread_values_die_at_once_unless_kept():
    produced = [[1, 2], [3]]
    consumed = [[0], [1]]
    nbytes = [0.0, 10.0, 500.0, 1.0]
    # value 2 is never read: counted at op 0 (peak 510), then freed
    assert live_peak(produced, consumed, nbytes, keep=set()) == 510.0
    produced2 = [[1], [2], [3]]
    consumed2 = [[0], [0], [1]]
    nbytes2 = [0.0, 10.0, 500.0, 1.0]
    # value 2 kept to the end: still alive at op 2 (10 + 500 + 1)
    assert live_peak(produced2, consumed2, nbytes2, keep={2}) == 511.0
    assert live_peak(produced2, consumed2, nbytes2, keep=set()) == 510.0


# ---------------------------------------------------------------- ILP


def _costs(*rows):
    return tuple(np.asarray(r, float) for r in rows)


def _check_consistent(request, result):
    obj, bad = ilp.evaluate(request, result.choice)
    assert bad == []
    assert obj == pytest.approx(result.objective)


def test_ilp_one_hot_choice_picks_cheapest_per_node():
    req = ilp.SolverRequest(_costs([3.0, 1.0, 2.0], [0.5, 0.25]))
    res = ilp.solve(req)
    assert res.status == "optimal"
    assert res.choice == (1, 1)
    assert res.objective == pytest.approx(1.25)
    _check_consistent(req, res)


def test_ilp_edge_makes_locally_cheap_choice_globally_worse():
    ident = np.arange(2)
    edge = ilp.Edge(0, 1, ident, ident, np.array([[0.0, 10.0], [0.0, 10.0]]))
    edge2 = ilp.Edge(0, 1, ident, ident, np.array([[10.0, 10.0], [0.0, 0.0]]))
    # node 0 alone prefers strategy 0 (cost 0 vs 1); the edge makes that cost 10 more
    req = ilp.SolverRequest(_costs([0.0, 1.0], [0.0, 0.0]), edges=(edge2,))
    res = ilp.solve(req)
    assert res.choice[0] == 1
    assert res.objective == pytest.approx(1.0)
    _check_consistent(req, res)
    # node 1 prefers strategy 1 locally, but the edge charges 10 for it
    req = ilp.SolverRequest(_costs([0.0, 0.0], [2.0, 0.0]), edges=(edge,))
    res = ilp.solve(req)
    assert res.choice[1] == 0
    assert res.objective == pytest.approx(2.0)
    _check_consistent(req, res)


def test_ilp_edge_with_layout_classes():
    # node 0 has 3 strategies producing classes (0, 1, 1); node 1 needs class 1 to be cheap
    edge = ilp.Edge(0, 1, np.array([0, 1, 1]), np.array([0, 1]), np.array([[0, 5.0], [5.0, 0]]))
    req = ilp.SolverRequest(_costs([0.0, 0.5, 0.25], [3.0, 0.0]), edges=(edge,))
    res = ilp.solve(req)
    assert res.choice == (2, 1)
    assert res.objective == pytest.approx(0.25)
    _check_consistent(req, res)


def test_ilp_tie_forces_equal_classes():
    tie = ilp.Tie(0, 1, np.array([0, 1]), np.array([1, 0]))  # node 1 numbers them reversed
    req = ilp.SolverRequest(_costs([0.0, 1.0], [0.0, 5.0]), ties=(tie,))
    # untied: (0, 0) at 0.0; tied: class(0,s0)=0 needs node 1 strategy 1 (5.0), so
    # (1, 0) at 1.0 wins
    res = ilp.solve(req)
    assert res.choice == (1, 0)
    assert res.objective == pytest.approx(1.0)
    _check_consistent(req, res)
    assert ilp.evaluate(req, (0, 0))[1] == ["tie 0-1: classes differ"]


def test_ilp_tie_of_a_node_with_itself():
    # one node, two numberings: only strategies whose classes agree (0 and 3) are legal
    tie = ilp.Tie(0, 0, np.array([0, 1, 2, 3]), np.array([0, 2, 1, 3]))
    req = ilp.SolverRequest(_costs([5.0, 0.0, 0.0, 4.0]), ties=(tie,))
    res = ilp.solve(req)
    assert res.choice == (3,)
    assert res.objective == pytest.approx(4.0)
    _check_consistent(req, res)
    assert ilp.evaluate(req, (1,))[1] == ["tie 0-0: classes differ"]


def test_ilp_infeasible_falls_back_to_replicated():
    tie = ilp.Tie(0, 1, np.array([0, 0]), np.array([1, 1]))
    req = ilp.SolverRequest(_costs([1.0, 0.0], [0.0, 2.0]), ties=(tie,))
    res = ilp.solve(req)
    assert res.status == "fallback"
    assert res.choice == (0, 0)
    assert res.objective == pytest.approx(1.0)
    assert ilp.evaluate(req, res.choice)[1] == ["tie 0-1: classes differ"]


def test_ilp_evaluate_reports_objective_of_any_choice():
    edge = ilp.Edge(0, 1, np.arange(2), np.arange(2), np.array([[1.0, 2.0], [3.0, 4.0]]))
    req = ilp.SolverRequest(_costs([10.0, 20.0], [100.0, 200.0]), edges=(edge,))
    assert ilp.evaluate(req, (1, 0)) == (20.0 + 100.0 + 3.0, [])
    res = ilp.solve(req)
    assert res.choice == (0, 0) and res.objective == pytest.approx(111.0)
    assert res.num_variables == 4 + 4
    assert res.num_constraints == 2 + 2 + 2


def test_ilp_evaluate_reports_out_of_range_strategy():
    req = ilp.SolverRequest(_costs([1.0, 2.0]))
    _, bad = ilp.evaluate(req, (2,))
    assert bad == ["node 0: strategy 2 out of range"]


# ---------------------------------------------------------------- strategies

STRAT_HW = Hardware(flops=1e12, bandwidth=1e10, latency=1e-5, memory_bandwidth=1e12)


def _matmul_info(m=8, k=16, n=32) -> OpInfo:
    view = OpView(
        "dot_general",
        ((m, k), (k, n)),
        ((m, n),),
        {"dimension_numbers": (((1,), (0,)), ((), ()))},
    )
    return OpInfo(
        "dot_general",
        factor_map(view),
        (4.0 * m * k, 4.0 * k * n),
        (4.0 * m * n,),
        (False, False),
    )


def _axes(spec):
    return [a for d in spec for a in d]


def test_first_strategy_is_fully_replicated():
    s0 = enumerate_strategies(_matmul_info(), MESH, STRAT_HW)[0]
    assert s0.in_specs == (((), ()), ((), ()))
    assert s0.out_specs == (((), ()),)
    assert s0.collectives == () and s0.axes_used == 0
    assert s0.name == "RR x RR -> RR"
    assert s0.cost == pytest.approx(2 * 8 * 16 * 32 / 1e12)


def test_every_spec_uses_each_mesh_axis_at_most_once():
    ss = enumerate_strategies(_matmul_info(), MESH, STRAT_HW)
    assert len(ss) > 16
    for s in ss:
        for spec in (*s.in_specs, *s.out_specs):
            assert len(_axes(spec)) == len(set(_axes(spec))), s.name
    names = [s.name for s in ss]
    assert len(names) == len(set(names))


def test_matmul_strategy_count_without_reduce_scatter():
    hw = STRAT_HW.with_(reduce_scatter=False)
    ss = enumerate_strategies(_matmul_info(), MESH, hw)
    # each of the 2 mesh axes: unused, or on m, k or n; all sizes divide
    assert len(ss) == 4 * 4


def test_divisibility_is_respected():
    # m = 6: axis 0 (2) divides it, axis 1 (4) and both (8) do not
    ss = enumerate_strategies(_matmul_info(m=6), MESH, STRAT_HW)
    lhs_dim0 = {s.in_specs[0][0] for s in ss}
    assert lhs_dim0 == {(), (0,)}
    for s in ss:
        assert 1 not in s.out_specs[0][0], s.name


def test_split_contraction_pays_an_all_reduce():
    ss = enumerate_strategies(_matmul_info(), MESH, STRAT_HW)
    by_name = {s.name: s for s in ss}
    s = by_name["RS1 x S1R -> RR [AR1]"]
    (c,) = s.collectives
    assert c == Collective(ALL_REDUCE, (1,), 4.0 * 8 * 32)
    flops = 2 * 8 * 16 * 32 / 4
    assert s.cost == pytest.approx(flops / 1e12 + coll.time(c, MESH, STRAT_HW))
    # every strategy that splits k (lhs dim 1) has a reduction collective over those axes
    for s in ss:
        k_axes = s.in_specs[0][1]
        if k_axes:
            assert [c.axes for c in s.collectives] == [tuple(sorted(k_axes))], s.name
            assert s.collectives[0].kind in (ALL_REDUCE, REDUCE_SCATTER)
        else:
            assert s.collectives == (), s.name


def test_reduce_scatter_variants_follow_the_hardware_flag():
    with_rs = enumerate_strategies(_matmul_info(), MESH, STRAT_HW.with_(reduce_scatter=True))
    without = enumerate_strategies(_matmul_info(), MESH, STRAT_HW.with_(reduce_scatter=False))
    rs = [s for s in with_rs if any(c.kind == REDUCE_SCATTER for c in s.collectives)]
    assert rs
    assert not [s for s in without if any(c.kind == REDUCE_SCATTER for c in s.collectives)]
    by_name = {s.name: s for s in with_rs}
    s = by_name["RS1 x S1R -> S1R [RS1]"]
    # the reduce-scatter reads the unscattered output, and leaves it split over axis 1
    assert s.collectives == (Collective(REDUCE_SCATTER, (1,), 4.0 * 8 * 32),)
    assert s.out_specs == (((1,), ()),)
    assert {s.name for s in without} < {s.name for s in with_rs}


def test_max_reduction_has_no_reduce_scatter():
    view = OpView("reduce_max", ((8, 16),), ((8,),), {"axes": (1,)})
    fm = factor_map(view)
    assert [f.kind for f in fm.factors] == ["pass", REDUCE]
    info = OpInfo("reduce_max", fm, (512.0,), (32.0,), (False,))
    ss = enumerate_strategies(info, MESH, STRAT_HW)
    kinds = {c.kind for s in ss for c in s.collectives}
    assert kinds == {ALL_REDUCE}
    assert {c.reduce_op for s in ss for c in s.collectives} == {"max"}


def test_literal_operands_have_no_spec():
    view = OpView("mul", ((8, 16), ()), ((8, 16),), {})
    info = OpInfo("mul", factor_map(view), (512.0, 0.0), (512.0,), (False, True))
    ss = enumerate_strategies(info, MESH, STRAT_HW)
    assert all(s.in_specs[1] is None for s in ss)
    assert ss[0].name == "RR x - -> RR"


def test_elementwise_strategy_counts_one_flop_per_element():
    view = OpView("exp", ((8, 16),), ((8, 16),), {})
    info = OpInfo("exp", factor_map(view), (512.0,), (512.0,), (False,))
    hw = Hardware(flops=1.0, bandwidth=1e10, memory_bandwidth=1e30)
    assert enumerate_strategies(info, MESH, hw)[0].cost == pytest.approx(128.0)


def test_source_strategies_on_2x4_mesh():
    ss = source_strategies((4, 8), 128.0, MESH, STRAT_HW)
    # per axis: unused / dim 0 / dim 1, minus dim 0 (size 4) over both axes (8)
    assert len(ss) == 3 * 3 - 1
    assert {spec_str(s.out_specs[0]) for s in ss} == {
        "RR",
        "S0R",
        "S1R",
        "RS0",
        "RS1",
        "S0S1",
        "S1S0",
        "RS01",
    }
    assert ss[0].out_specs == (((), ()),)
    assert ss[0].cost == pytest.approx(128.0 / 1e12)
    by = {spec_str(s.out_specs[0]): s for s in ss}
    assert by["RS01"].cost == pytest.approx(128.0 / 8 / 1e12)
    assert source_strategies((4, 8), 128.0, MESH, STRAT_HW, replicated_only=True) == ss[:1]


def test_spec_str():
    assert spec_str(None) == "-"
    assert spec_str(()) == "()"
    assert spec_str(((0, 1), (), (2,))) == "S01RS2"


def test_reshard_gathers_one_dimension_at_a_time_minor_first():
    mesh = MeshDesc((2, 4), ("x", "y"))
    # (R, S_y, R, S_x) -> replicated: gather x on dim 3, then y on dim 1
    cs = reshard(((), (1,), (), (0,)), ((), (), (), ()), 32768.0, mesh)
    assert [(c.kind, c.axes, c.nbytes) for c in cs] == [
        ("all-gather", (0,), 32768.0 / 4),
        ("all-gather", (1,), 32768.0),
    ]


def test_reshard_moving_axes_between_several_dimension_pairs_is_a_gather():
    mesh = MeshDesc((2, 4), ("x", "y"))
    # (S_x, S_y, R) -> (R, R, S_xy): no single all-to-all; XLA replicates and slices
    cs = reshard(((0,), (1,), ()), ((), (), (0, 1)), 8192.0, mesh)
    assert [c.kind for c in cs] == ["all-gather", "all-gather"]
    # one pair of dimensions: an all-to-all
    cs = reshard(((0, 1), (), ()), ((), (), (0, 1)), 8192.0, mesh)
    assert [(c.kind, c.axes, c.nbytes) for c in cs] == [("all-to-all", (0, 1), 1024.0)]


def test_ilp_shared_cost_is_paid_once_by_all_members():
    # two nodes; strategy 1 of each is cheaper alone but joins a shared fixed cost
    shared = ilp.SharedCost(3.0, ((0, (1,)), (1, (1,))))
    req = ilp.SolverRequest((np.array([2.0, 0.0]), np.array([2.0, 0.0])), shared=(shared,))
    res = ilp.solve(req)
    assert res.choice == (1, 1) and res.objective == pytest.approx(3.0)  # 0 + 0 + 3 once
    assert ilp.evaluate(req, (0, 1))[0] == pytest.approx(5.0)
    assert ilp.evaluate(req, (0, 0))[0] == pytest.approx(4.0)
    # a larger shared cost makes the members avoid it
    dear = ilp.SolverRequest(req.node_costs, shared=(ilp.SharedCost(5.0, shared.members),))
    assert ilp.solve(dear).choice == (0, 0)
