"""Rematerialisation under a memory budget: a scaled-down scanned GPT, compile-only.

Each case is built from ShapeDtypeStructs (nothing initialised) and planned on a
(2, 4) mesh of 8 emulated CPU devices with the state donated: first with no budget
and remat=None (the reference footprint M), then under budgets that are fractions
of M with remat="auto". For every plan it prints the budget, the remat chosen, the
predicted and compiled per-device memory (arguments + outputs - aliased + temp from
compiled.memory_analysis()) and the predicted step time; for the budgets it also
says what remat=None gives (the fitting plan's time, or "no plan fits").

    .venv/bin/python scripts/remat_report.py               # all cases
    .venv/bin/python scripts/remat_report.py small         # names containing "small"
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, gpt_scan  # noqa: E402
from autoshard.models.common import abstract_setup  # noqa: E402

MESH = (2, 4)
HW = autoshard.PRESETS["cpu"].with_(memory=1e12, name="cpu, no budget")
FRACTIONS = (1.5, 0.8, 0.5)


def _gpt(d, layers, seq, vocab):
    return gpt.GPTConfig(
        vocab=vocab, d_model=d, n_heads=d // 64, n_layers=layers, seq_len=seq, d_ff=4 * d
    )


CASES = [
    ("gpt2-small shape /4, scan", _gpt(192, 4, 256, 4096), 16),
    ("gpt2-medium shape /4, scan", _gpt(256, 8, 256, 4096), 16),
]


def compiled_bytes(step, s) -> int:
    return autoshard.compiled_memory(step.lower(s.state, s.batch).compile())


def plan_with(s, budget, remat):
    step = autoshard.parallelize(
        s.train_step,
        mesh=MESH,
        hardware=HW,
        donate_argnums=0,
        memory_budget=budget,
        remat=remat,
        pipeline=None,
    )
    t0 = time.perf_counter()
    try:
        plan = step.plan(s.state, s.batch)
    except autoshard.MemoryBudgetError:
        return None, None, time.perf_counter() - t0
    return step, plan, time.perf_counter() - t0


def row(name, budget, step, plan, secs, s, without: str) -> str:
    mib = 2**20
    pred, comp = plan.cost.memory["total"], compiled_bytes(step, s)
    r = plan.remat
    chosen = f"{r.policy}" if r else "none"
    b = f"{budget / mib:.1f}" if budget else "none"
    return (
        f"| {name} | {b} | {chosen} | {pred / mib:.1f} | {comp / mib:.1f} | {pred / comp:.2f} "
        f"| {'yes' if not budget or comp <= budget else 'NO'} | {plan.cost.time * 1e3:.2f} "
        f"| {without} | {secs:.1f} |"
    )


def main(pattern: str = "") -> None:
    print(f"mesh {MESH}, state donated, hardware {HW.name!r}; MiB per device, ms per step")
    print(
        "| case | budget | remat | predicted | compiled | pred/comp | compiled fits | "
        "predicted step | remat=None at this budget | plan s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, config, batch in CASES:
        if pattern not in name:
            continue
        s = abstract_setup(gpt_scan.setup, config, batch)
        step, ref, secs = plan_with(s, None, None)
        print(row(name, None, step, ref, secs, s, "-"), flush=True)
        for frac in FRACTIONS:
            budget = frac * ref.cost.memory["total"]
            _, plain, _ = plan_with(s, budget, None)
            without = "no plan fits" if plain is None else f"{plain.cost.time * 1e3:.2f} ms"
            step, plan, secs = plan_with(s, budget, "auto")
            if plan is None:
                print(f"| {name} | {budget / 2**20:.1f} | no plan fits even with remat |")
                continue
            print(row(name, budget, step, plan, secs, s, without), flush=True)


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main(sys.argv[1] if len(sys.argv) > 1 else "")
