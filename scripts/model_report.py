"""One line per model family and regime: the mesh and plan found (what is split how),
predicted vs compiled collectives, and plan time, on 8 emulated CPU devices.

    .venv/bin/python scripts/model_report.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, gpt_linen, gpt_scan, llama, moe, wresnet  # noqa: E402

CPU = autoshard.PRESETS["cpu"]
GQA = dict(d_model=256, n_heads=8, n_layers=1, d_ff=512, seq_len=64)
WIDE_RESNET = wresnet.WResNetConfig(
    blocks=(1,), base_width=256, width_factor=1, num_classes=4, image_size=8, channels=3,
    stem_kernel=3, stem_stride=1,
)  # fmt: skip
LARGE_EXPERTS = moe.MoEConfig(
    vocab=64, d_model=64, n_heads=4, n_layers=1, seq_len=16, n_experts=8, d_ff=1024,
    capacity_factor=2.0,
)  # fmt: skip
CASES = [
    ("Llama tiny (GQA 4q/2kv)", llama, llama.tiny(), 4, None),
    ("Llama GQA 8q/2kv, batch 1", llama, llama.tiny(n_kv_heads=2, **GQA), 1, (8,)),
    ("MoE tiny", moe, moe.tiny(), 8, None),
    ("MoE large experts", moe, LARGE_EXPERTS, 16, (8,)),
    ("Wide-ResNet tiny, batch 256", wresnet, wresnet.tiny(), 256, (8,)),
    ("Wide-ResNet 256 wide, batch 8", wresnet, WIDE_RESNET, 8, (8,)),
    ("GPT (Linen) tiny", gpt_linen, gpt_linen.tiny(), 8, None),
    ("GPT (nnx.scan) tiny", gpt_scan, gpt_scan.tiny(), 8, None),
    (
        "GPT (nnx.scan) wide, batch 1",
        gpt_scan,
        gpt.GPTConfig(vocab=64, d_model=512, n_heads=8, n_layers=2, seq_len=8, d_ff=1024),
        1,
        (8,),
    ),
    (
        "GPT vocab 16384, d 32",
        gpt,
        gpt.GPTConfig(vocab=16384, d_model=32, n_heads=2, n_layers=1, seq_len=8, d_ff=64),
        2,
        (8,),
    ),
    (
        "GPT seq 512, d 16",
        gpt,
        gpt.GPTConfig(vocab=32, d_model=16, n_heads=2, n_layers=1, seq_len=512, d_ff=32),
        1,
        (8,),
    ),
]


def short(path: str) -> str:
    """state.params['blocks'][0]['attn']['q']['kernel'].value -> blocks.0.attn.q.kernel"""
    inner = path.removeprefix("state.params").removesuffix(".value")
    return ".".join(p.strip("'") for p in inner.strip("[]").split("]["))


def splits(plan) -> str:
    """The split parameters (state.params only) grouped by spec, and the batch."""
    by_spec: dict[str, list[str]] = {}
    for e in plan.inputs:
        if e.path.startswith("state.params") and any(e.spec):
            by_spec.setdefault(str(tuple(e.spec)), []).append(short(e.path))
    batch = [str(tuple(e.spec)) for e in plan.inputs if e.path.startswith("batch")]
    parts = [
        f"{spec}: {', '.join(names[:6])}{' …' * (len(names) > 6)}"
        for spec, names in by_spec.items()
    ]
    return "; ".join(parts or ["all parameters replicated"]) + f" | batch {', '.join(batch)}"


def main() -> None:
    for title, module, cfg, batch, mesh in CASES:
        s = module.setup(cfg, batch)
        t0 = time.perf_counter()
        step = autoshard.parallelize(s.train_step, mesh=mesh, hardware=CPU, time_limit=20.0)
        plan = step.plan(s.state, s.batch)
        plan_time = time.perf_counter() - t0
        compiled = autoshard.collectives(step.lower(s.state, s.batch).compile())
        predicted = {k: (n, int(b)) for k, (n, b) in sorted(plan.cost.collectives.items())}
        compiled = {k: (n, int(b)) for k, (n, b) in sorted(compiled.items())}
        same = "equal" if predicted == compiled else "DIFFER"
        print(
            f"\n{title}: mesh {tuple(plan.mesh.devices.shape)} (asked {mesh}), "
            f"plan {plan_time:.1f} s"
        )
        print(f"  split: {splits(plan)}")
        print(f"  collectives predicted {predicted}")
        print(f"              compiled  {compiled} ({same})")
        jax.clear_caches()


if __name__ == "__main__":
    main()
