"""Budget -> plan -> predicted vs compiled per-device memory -> predicted step time, for
the MLP and GPT on 8 emulated CPU devices (state donated, reduce-scatters allowed).

    .venv/bin/python scripts/memory_report.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, mlp  # noqa: E402

HW = autoshard.PRESETS["cpu"].with_(reduce_scatter=True, name="cpu + reduce-scatter")
CASES = [
    ("MLP 512-256-512 x4, batch 512", lambda: mlp.setup(mlp.MLPConfig(512, 256, 4), 512)),
    ("GPT tiny, batch 32", lambda: gpt.setup(gpt.tiny(), 32)),
]
FRACTIONS = (None, 1.0, 0.8, 0.7, 0.6, 0.5, 0.4)



def describe(plan) -> str:
    split = [e for e in plan.inputs if any(e.spec)]
    params = sum("params" in e.path for e in split)
    moments = sum("opt_state" in e.path for e in split)
    kinds = ", ".join(f"{k} x{n}" for k, (n, _) in sorted(plan.cost.collectives.items()))
    return f"{params} params + {moments} moments split; {kinds or 'no collectives'}"


def main() -> None:
    kib = 1024
    for title, make in CASES:
        s = make()
        print(f"\n{title} on mesh (8,), hardware '{HW.name}'")
        print("| budget | plan | predicted | compiled | pred/comp | step |")
        print("|---|---|---|---|---|---|")
        free = None
        for f in FRACTIONS:
            budget = None if f is None else f * free
            step = autoshard.parallelize(
                s.train_step, mesh=(8,), hardware=HW, donate_argnums=0, memory_budget=budget
            )
            label = "default" if f is None else f"{f:.1f} x default = {budget / kib:.0f} KiB"
            try:
                plan = step.plan(s.state, s.batch)
            except autoshard.MemoryBudgetError as e:
                least = str(e).split("The least memory found for any plan is ")[1].split(" per")[0]
                print(f"| {label} | MemoryBudgetError: least reachable {least} | | | | |")
                continue
            predicted = plan.cost.memory["total"]
            free = predicted if free is None else free
            compiled = autoshard.compiled_memory(step.lower(s.state, s.batch).compile())
            print(
                f"| {label} | {describe(plan)} | {predicted / kib:.0f} KiB | "
                f"{compiled / kib:.0f} KiB | {predicted / compiled:.2f} | "
                f"{plan.cost.time * 1e3:.3f} ms |"
            )
            jax.clear_caches()


if __name__ == "__main__":
    main()
