"""The pipeline cost model as plain numbers: bubble, ticks, transfers, memory."""

import pytest

from autoshard.cost_model import pipeline as cm
from autoshard.cost_model.hardware import Hardware

HW = Hardware(flops=1e12, bandwidth=(1e9, 1e11), latency=(1e-5, 1e-6))


@pytest.mark.parametrize(("p", "m", "bubble"), [(1, 8, 0.0), (4, 8, 3 / 11), (4, 4, 3 / 7)])
def test_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m, bubble):
    assert cm.bubble_fraction(p, m) == pytest.approx(bubble)
    assert cm.ticks(p, m) == m + p - 1


def test_loop_time_spreads_layers_over_stages_with_the_bubble():
    # 8 s of layers on 4 stages with 8 microbatches: 11 ticks of 8/4/8 s
    assert cm.loop_time(8.0, 4, 8) == pytest.approx(11 * 0.25)
    # the idle fraction of the pipelined loop is the bubble
    busy = 8.0 / 4
    assert 1 - busy / cm.loop_time(8.0, 4, 8) == pytest.approx(cm.bubble_fraction(4, 8))
    # more microbatches: less bubble
    assert cm.loop_time(8.0, 4, 32) < cm.loop_time(8.0, 4, 8)


def test_transfers_are_point_to_point_per_tick_on_the_pipeline_axis():
    nbytes = 64e3  # whole batch's boundary per device
    slow = cm.transfer_time(nbytes, 4, 8, HW, 0)
    assert slow == pytest.approx(11 * (1e-5 + 8e3 / 1e9))
    fast = cm.transfer_time(nbytes, 4, 8, HW, 1)
    assert fast == pytest.approx(11 * (1e-6 + 8e3 / 1e11))
    assert cm.transfer_time(nbytes, 1, 8, HW, 0) == 0.0
    # the last stage's outputs reach every stage by one all-reduce (ring 2(p-1)/p)
    assert cm.gather_time(nbytes, 4, HW, 0) == pytest.approx(1e-5 + 1.5 * nbytes / 1e9)


def test_activation_memory_gpipe_keeps_m_microbatches_1f1b_about_p():
    r = 1024.0  # residuals of every layer for the whole batch
    # GPipe: a stage's layers (1/p) for all m microbatches
    assert cm.activation_memory(r, 4, 16, cm.GPIPE) == pytest.approx(r / 4)
    # 1F1B: p of the m microbatches
    assert cm.activation_memory(r, 4, 16, cm.ONE_F_ONE_B) == pytest.approx(r / 4 * 4 / 16)
    # with no more microbatches than stages the two hold the same
    assert cm.activation_memory(r, 4, 4, cm.ONE_F_ONE_B) == cm.activation_memory(r, 4, 4, cm.GPIPE)


def test_microbatch_candidates_divide_the_batch():
    assert cm.microbatch_candidates(64, 4) == [4, 8, 16]
    assert cm.microbatch_candidates(12, 4) == [4, 6, 12]
    assert cm.microbatch_candidates(6, 4) == [6]
    assert cm.microbatch_candidates(3, 4) == []  # fewer rows than stages: never pipelined
