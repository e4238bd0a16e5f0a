"""Plan a real-size scanned GPT for a pod this machine does not have, and print the
plan and its export as logical-axis rules.

    .venv/bin/python scripts/pod_plan.py                       # GPT-2 small, v6e, (16, 16)
    .venv/bin/python scripts/pod_plan.py tpu-v5p 64 search     # devices=64, mesh search
"""

from __future__ import annotations

import sys
import time

import jax

import autoshard
from autoshard.models import gpt_scan
from autoshard.models.common import abstract_setup


def main(preset: str = "tpu-v6e", devices: int = 256, how: str = "16x16") -> None:
    config = gpt_scan.GPTConfig(vocab=50304, d_model=768, n_heads=12, n_layers=12, seq_len=1024)
    s = abstract_setup(gpt_scan.setup, config, devices)  # one sequence per device
    hw = autoshard.PRESETS[preset]
    if how == "search":
        step = autoshard.parallelize(s.train_step, devices=devices, hardware=hw, donate_argnums=0)
    else:
        shape = tuple(int(a) for a in how.split("x"))
        mesh = jax.sharding.AbstractMesh(shape, ("data", "model")[: len(shape)])
        step = autoshard.parallelize(s.train_step, mesh=mesh, hardware=hw, donate_argnums=0)
    t0 = time.perf_counter()
    plan = step.plan(s.state, s.batch)
    print(f"planned in {time.perf_counter() - t0:.1f} s on {hw.name}")
    print("\n".join(line for line in plan.summary().splitlines() if "opt_state" not in line))
    print(plan.export(rules=True).split("logical_axes")[0])


if __name__ == "__main__":
    a = sys.argv[1:]
    main(
        a[0] if a else "tpu-v6e", int(a[1]) if len(a) > 1 else 256, a[2] if len(a) > 2 else "16x16"
    )
