"""Predicted vs compiled per-device memory for scaled-down real models, compile-only.

Each case is built from ShapeDtypeStructs (nothing initialised), planned on a (2, 4)
mesh of 8 emulated CPU devices with the state donated, lowered and compiled (never
run); the compiled figure is arguments + outputs - aliased + temporaries from
compiled.memory_analysis(). The cases keep the proportions of GPT-2 and Llama-7B
(d_ff = 4 d or 8/3 d, head size 64) at sizes that compile in seconds, unrolled and
with layers under lax.scan, where the residuals the backward pass reads are stacked
over all layers.

    .venv/bin/python scripts/memory_scale.py            # all cases
    .venv/bin/python scripts/memory_scale.py scan       # names containing "scan"
    MESH=4,8 .venv/bin/python scripts/memory_scale.py llama   # 32 emulated devices
"""

from __future__ import annotations

import os
import sys
import time

MESH = tuple(int(a) for a in os.environ.get("MESH", "2,4").split(","))
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={MESH[0] * MESH[1]}")

import jax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, gpt_scan, llama  # noqa: E402
from autoshard.models.common import abstract_setup  # noqa: E402

HW = autoshard.PRESETS["cpu"].with_(memory=1e12, name="cpu, no budget")


def _gpt(d, layers, seq, vocab):
    return gpt.GPTConfig(
        vocab=vocab, d_model=d, n_heads=d // 64, n_layers=layers, seq_len=seq, d_ff=4 * d
    )


def _llama(d, layers, seq, vocab, dtype="float32"):
    return llama.LlamaConfig(
        vocab=vocab,
        d_model=d,
        n_heads=d // 64,
        n_kv_heads=d // 64,
        n_layers=layers,
        seq_len=seq,
        d_ff=8 * d // 3 // 64 * 64,
        dtype=dtype,
    )


CASES = [
    ("gpt2-small shape /4, unrolled", gpt.setup, _gpt(192, 4, 256, 4096), 16),
    ("gpt2-small shape /4, scan", gpt_scan.setup, _gpt(192, 4, 256, 4096), 16),
    ("gpt2-medium shape /4, scan", gpt_scan.setup, _gpt(256, 8, 256, 4096), 16),
    ("llama-7b shape /16, unrolled", llama.setup, _llama(256, 4, 256, 4096), 16),
    ("llama-7b shape /16, bf16, unrolled", llama.setup, _llama(256, 4, 256, 4096, "bfloat16"), 16),
    # real sizes (layers under scan; compile-only, nothing is allocated)
    ("real gpt2-small, scan", gpt_scan.setup, _gpt(768, 12, 1024, 50304), 8),
    ("real gpt2-small, unrolled", gpt.setup, _gpt(768, 12, 1024, 50304), 8),
    ("real gpt2-medium, scan", gpt_scan.setup, _gpt(1024, 24, 1024, 50304), 8),
    ("real 7b-shape gpt, scan", gpt_scan.setup, _gpt(4096, 32, 2048, 32000), 8),
]



def measure(setup, config, batch):
    s = abstract_setup(setup, config, batch)
    step = autoshard.parallelize(s.train_step, mesh=MESH, hardware=HW, donate_argnums=0)
    t0 = time.perf_counter()
    plan = step.plan(s.state, s.batch)
    t1 = time.perf_counter()
    compiled = step.lower(s.state, s.batch).compile()
    return plan, compiled, t1 - t0, time.perf_counter() - t1


def main(pattern: str = "") -> None:
    mib = 2**20
    print(f"mesh {MESH}, state donated; MiB per device")
    print(
        "| case | predicted | compiled | pred/comp | args | temp (compiled) | activations "
        "(predicted) | plan s | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, setup, config, batch in CASES:
        if pattern not in name:
            continue
        plan, compiled, tp, tc = measure(setup, config, batch)
        m = compiled.memory_analysis()
        pred, comp = plan.cost.memory["total"], autoshard.compiled_memory(compiled)
        print(
            f"| {name} | {pred / mib:.1f} | {comp / mib:.1f} | {pred / comp:.2f} | "
            f"{m.argument_size_in_bytes / mib:.1f} | {m.temp_size_in_bytes / mib:.1f} | "
            f"{plan.cost.memory['activations_peak'] / mib:.1f} | {tp:.1f} | {tc:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main(sys.argv[1] if len(sys.argv) > 1 else "")
