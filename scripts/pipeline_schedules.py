"""GPipe against 1F1B: compiled temporary memory, the cost model's activation memory
per stage, and the difference from jax.jit after two steps, for the residual stack
(8 layers, d 256, batch 64, 4 stages on mesh (4, 2)) at several microbatch counts,
and for a GPT under nnx.scan (2 stages on (2, 4)).

    .venv/bin/python scripts/pipeline_schedules.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, gpt_scan, residual_stack  # noqa: E402

HW = autoshard.Hardware(flops=2e11, bandwidth=5e9, latency=1e-5, memory_bandwidth=2e10)
GPT = gpt.GPTConfig(vocab=256, d_model=128, n_heads=4, n_layers=4, seq_len=32, d_ff=512)


def max_err(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def run(name, s, mesh, stages, ms) -> None:
    ref = jax.jit(s.train_step)
    b = s.state
    for _ in range(2):
        b, _ = ref(b, s.batch)
    print(f"\n{name}, mesh {mesh}, {stages} stages")
    print("| m | schedule | compiled temp KiB | predicted activations KiB | max |diff| vs jit |")
    print("|---|---|---|---|---|")
    for m in ms:
        temps = {}
        for sched in ("gpipe", "1f1b"):
            pipe = autoshard.Pipeline(stages, m, schedule=sched)
            step = autoshard.parallelize(s.train_step, mesh=mesh, hardware=HW, pipeline=pipe)
            c = step.lower(s.state, s.batch).compile()
            temp = c.memory_analysis().temp_size_in_bytes
            acts = step.plan(s.state, s.batch).pipeline.stage_memory["activations_peak"]
            a = s.state
            for _ in range(2):
                a, _ = step(a, s.batch)
            temps[sched] = (temp, acts)
            err = max_err(a, b)
            print(f"| {m} | {sched} | {temp / 1024:.1f} | {acts / 1024:.1f} | {err:.1e} |")
        (tg, ag), (t1, a1) = temps["gpipe"], temps["1f1b"]
        print(
            f"| {m} | 1f1b saves | {(tg - t1) / 1024:.1f} ({t1 / tg:.2f}x) | "
            f"{(ag - a1) / 1024:.1f} | |"
        )


def main() -> None:
    stack = residual_stack.setup(residual_stack.StackConfig(), 64)
    run("residual stack d256 x8, batch 64", stack, (4, 2), 4, (4, 8, 16))
    run("GPT under nnx.scan, 4 layers d128, batch 16", gpt_scan.setup(GPT, 16), (2, 4), 2, (8,))


if __name__ == "__main__":
    main()
