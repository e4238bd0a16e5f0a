"""Predicted vs compiled per-device memory, scaled-down and real-size models, compile-only.

Each case is built from ShapeDtypeStructs (nothing initialised), planned with the state
donated on a mesh of emulated CPU devices, lowered and compiled (never run); the
compiled figure is arguments + outputs - aliased + temporaries from
compiled.memory_analysis() (autoshard.compiled_memory). The scaled-down cases keep the
proportions of GPT-2 and Llama-7B (d_ff = 4 d or 8/3 d, head size 64); the real-size
ones are GPT-2 small and medium, a 1.3B GPT (GPT-3 XL widths), and Llama-7B (Llama-2
widths, 8 KV heads as in the larger Llama-2s), unrolled and with the layers under
lax.scan, where the residuals the backward pass reads are stacked over all layers.

    .venv/bin/python scripts/memory_scale.py            # every case for the mesh
    .venv/bin/python scripts/memory_scale.py scan       # names containing "scan"
    MESH=4,8 .venv/bin/python scripts/memory_scale.py   # the cases planned for 32 devices

Each case names the mesh it is planned for: MESH=2,4 (the default, 8 emulated devices)
runs the (2, 4) cases, MESH=4,8 (32 emulated devices) the (4, 8) ones. Hardware: the
`cpu` preset without a memory budget (`cpu` predicts what the CPU compiler keeps: it
computes bf16 matmuls in f32, see docs/pods.md).
"""

from __future__ import annotations

import os
import sys
import time

MESH = tuple(int(a) for a in os.environ.get("MESH", "2,4").split(","))
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={MESH[0] * MESH[1]}")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, gpt_scan, llama  # noqa: E402
from autoshard.models.common import abstract_setup, setup_model  # noqa: E402

HW = autoshard.PRESETS["cpu"].with_(memory=1e12, name="cpu, no budget")


def _gpt(d, layers, seq, vocab, head=64):
    return gpt.GPTConfig(
        vocab=vocab, d_model=d, n_heads=d // head, n_layers=layers, seq_len=seq, d_ff=4 * d
    )


def _llama(d, layers, seq, vocab, dtype="float32", kv=None, d_ff=None):
    return llama.LlamaConfig(
        vocab=vocab,
        d_model=d,
        n_heads=d // 64,
        n_kv_heads=kv or d // 64,
        n_layers=layers,
        seq_len=seq,
        d_ff=d_ff or 8 * d // 3 // 64 * 64,
        dtype=dtype,
    )


class ScannedLlama(llama.Llama):
    """The Llama of autoshard.models.llama with its blocks stacked (every block
    parameter has a leading n_layers dimension) and run by nnx.scan."""

    def __init__(self, config: llama.LlamaConfig, rngs: nnx.Rngs):
        dt = config.jnp_dtype
        self.embed = nnx.Embed(config.vocab, config.d_model, dtype=dt, param_dtype=dt, rngs=rngs)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> llama.Block:
            return llama.Block(config, rngs)

        self.blocks = make(rngs)
        self.norm = llama.RMSNorm(config.d_model, config.norm_eps, dt)
        self.head = llama._linear(config.d_model, config.vocab, config, rngs)
        self.loss_chunk = 0  # the loss reads the logits whole (llama.loss_fn)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x: jax.Array, block: llama.Block) -> jax.Array:
            return block(x)

        return self.head(self.norm(run(self.embed(tokens), self.blocks)))


def llama_scan_setup(config: llama.LlamaConfig, batch_size: int):
    """A ScannedLlama, its adamw train step, initial state and one synthetic batch."""
    return setup_model(ScannedLlama, llama.loss_fn, llama.synthetic_batch, config, batch_size)


LLAMA_7B = dict(d=4096, layers=32, seq=2048, vocab=32000, kv=8, d_ff=11008)
# (name, mesh, setup, config, global batch)
CASES = [
    ("gpt2-small shape /4, unrolled", (2, 4), gpt.setup, _gpt(192, 4, 256, 4096), 16),
    ("gpt2-small shape /4, scan", (2, 4), gpt_scan.setup, _gpt(192, 4, 256, 4096), 16),
    ("gpt2-medium shape /4, scan", (2, 4), gpt_scan.setup, _gpt(256, 8, 256, 4096), 16),
    ("llama-7b shape /16, unrolled", (2, 4), llama.setup, _llama(256, 4, 256, 4096), 16),
    ("llama-7b shape /16, unrolled", (4, 8), llama.setup, _llama(256, 4, 256, 4096), 16),
    (
        "llama-7b shape /16, bf16, unrolled",
        (2, 4),
        llama.setup,
        _llama(256, 4, 256, 4096, "bfloat16"),
        16,
    ),
    (
        "llama-7b shape /16, bf16, unrolled",
        (4, 8),
        llama.setup,
        _llama(256, 4, 256, 4096, "bfloat16"),
        16,
    ),
    # real sizes (compile-only, nothing is allocated)
    ("real gpt2-small, unrolled", (2, 4), gpt.setup, _gpt(768, 12, 1024, 50304), 8),
    ("real gpt2-small, scan", (2, 4), gpt_scan.setup, _gpt(768, 12, 1024, 50304), 8),
    ("real gpt2-medium, unrolled", (2, 4), gpt.setup, _gpt(1024, 24, 1024, 50304), 8),
    ("real gpt2-medium, scan", (2, 4), gpt_scan.setup, _gpt(1024, 24, 1024, 50304), 8),
    ("real 1.3b gpt, unrolled", (2, 4), gpt.setup, _gpt(2048, 24, 2048, 50304, 128), 8),
    ("real 7b-shape gpt, scan", (2, 4), gpt_scan.setup, _gpt(4096, 32, 2048, 32000), 8),
    ("real llama-7b, unrolled", (4, 8), llama.setup, _llama(**LLAMA_7B), 32),
    ("real llama-7b, scan", (2, 4), llama_scan_setup, _llama(**LLAMA_7B), 8),
    (
        "real llama-7b, bf16, scan",
        (2, 4),
        llama_scan_setup,
        _llama(**LLAMA_7B, dtype="bfloat16"),
        8,
    ),
]


def measure(mesh, setup, config, batch):
    s = abstract_setup(setup, config, batch)
    step = autoshard.parallelize(
        s.train_step, mesh=mesh, hardware=HW, donate_argnums=0, verbose=False
    )
    t0 = time.perf_counter()
    plan = step.plan(s.state, s.batch)
    t1 = time.perf_counter()
    compiled = step.lower(s.state, s.batch).compile()
    return plan, compiled, t1 - t0, time.perf_counter() - t1


def main(pattern: str = "") -> None:
    mib = 2**20
    print(f"mesh {MESH}, state donated; MiB per device")
    print(
        "| case | mesh | predicted | compiled | pred/comp | args | temp (compiled) | "
        "activations (predicted) | plan s | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, mesh, setup, config, batch in CASES:
        if pattern not in name or mesh != MESH:
            continue
        plan, compiled, tp, tc = measure(mesh, setup, config, batch)
        m = compiled.memory_analysis()
        pred, comp = plan.cost.memory["total"], autoshard.compiled_memory(compiled)
        print(
            f"| {name} | {mesh} | {pred / mib:.1f} | {comp / mib:.1f} | {pred / comp:.2f} | "
            f"{m.argument_size_in_bytes / mib:.1f} | {m.temp_size_in_bytes / mib:.1f} | "
            f"{plan.cost.memory['activations_peak'] / mib:.1f} | {tp:.1f} | {tc:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main(sys.argv[1] if len(sys.argv) > 1 else "")
