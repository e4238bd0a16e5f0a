"""Plan and train a GPT on every visible device (8 emulated CPU devices by default).

bash scripts/dev.sh demo            # or: python demo.py --steps 30 --mesh 2,4
"""

from __future__ import annotations

import argparse
import os
import time

# 8 emulated CPU devices unless the user asked for something else.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mesh", default="auto", help="'auto' or a shape like 2,4")
    args = ap.parse_args()
    mesh = None if args.mesh == "auto" else tuple(int(x) for x in args.mesh.split(","))

    config = gpt.demo()
    s = gpt.setup(config, batch_size=args.batch, learning_rate=3e-3)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    print(f"model: {config}\n")

    step = autoshard.parallelize(s.train_step, mesh=mesh, time_limit=30.0)
    t0 = time.perf_counter()
    plan = step.plan(s.state, s.batch)
    print(f"planned in {time.perf_counter() - t0:.1f} s\n")
    print(plan.summary(), "\n")

    compiled = autoshard.collectives(step.lower(s.state, s.batch).compile())
    print("collective       predicted (count, bytes)   compiled (count, bytes)")
    for kind in sorted(set(compiled) | set(plan.cost.collectives)):
        p = plan.cost.collectives.get(kind, (0, 0))
        c = compiled.get(kind, (0, 0))
        print(f"{kind:<16} {p[0]:>4} {p[1]:>12.0f}            {c[0]:>4} {c[1]:>12}")
    print()

    ref_loss = float(jax.jit(s.train_step)(s.state, s.batch)[1]["loss"])
    state = s.state
    for i in range(args.steps):
        state, metrics = step(state, s.batch)
        loss = float(metrics["loss"])
        if i == 0:
            print(f"step 0 loss {loss:.5f} (single device: {ref_loss:.5f})")
        elif i % 5 == 4 or i == args.steps - 1:
            print(f"step {i} loss {loss:.5f}")


if __name__ == "__main__":
    main()
