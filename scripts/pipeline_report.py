"""Pipeline or not: the plans autoshard chooses for a scanned layer stack on meshes
with a slow first axis and on fast ones, next to the best intra-operator plan and a
forced GPipe plan; predicted vs compiled collectives and the difference from jax.jit.

    .venv/bin/python scripts/pipeline_report.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, gpt_scan, residual_stack  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

BASE = autoshard.Hardware(
    flops=2e11, bandwidth=5e9, latency=1e-5, memory_bandwidth=2e10, reduce_scatter=False
)
SLOW = BASE.with_(bandwidth=(1e9, 100e9), name="axis 0 1 GB/s, axis 1 100 GB/s")
FAST = BASE.with_(bandwidth=(50e9, 100e9), name="axis 0 50 GB/s, axis 1 100 GB/s")
GPT = gpt.GPTConfig(vocab=256, d_model=128, n_heads=4, n_layers=4, seq_len=32, d_ff=512)
CASES = [
    (
        "residual stack d256 x8, batch 64",
        residual_stack.setup(residual_stack.StackConfig(), 64),
        (4, 2),
        autoshard.Pipeline(4, 8),
    ),
    (
        "GPT under nnx.scan, 4 layers d128, batch 16",
        gpt_scan.setup(GPT, 16),
        (2, 4),
        autoshard.Pipeline(2, 8),
    ),
]


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def colls(c) -> str:
    return ", ".join(f"{k} x{n} ({b / 1024:.1f} KiB)" for k, (n, b) in sorted(c.items())) or "none"


def describe(plan) -> str:
    pl = plan.pipeline
    if pl is None:
        return "intra-operator"
    return f"GPipe {pl.stages} stages on {pl.axis!r} x {pl.microbatches} microbatches"


def report(name, s, mesh, pipe, hw) -> None:
    print(f"## {name}, mesh {mesh}, {hw.name}")
    ref = jax.jit(s.train_step)(s.state, s.batch)
    for label, p in (("auto", "auto"), ("intra only", None), ("forced", pipe)):
        step = autoshard.parallelize(s.train_step, mesh=mesh, hardware=hw, pipeline=p)
        plan = step.plan(s.state, s.batch)
        compiled = autoshard.collectives(step.lower(s.state, s.batch).compile())
        out = step(s.state, s.batch)
        print(
            f"{label:>10}: {describe(plan)}; predicted {plan.cost.time * 1e3:.3f} ms; "
            f"loss diff {abs(float(out[1]['loss']) - float(ref[1]['loss'])):.1e}, "
            f"state diff {max_diff(out[0], ref[0]):.1e}"
        )
        print(f"{'':>12}predicted {colls(plan.cost.collectives)}")
        print(f"{'':>12}compiled  {colls(compiled)}")
    print()


def main() -> None:
    for name, s, mesh, pipe in CASES:
        for hw in (SLOW, FAST):
            report(name, s, mesh, pipe, hw)


if __name__ == "__main__":
    main()
