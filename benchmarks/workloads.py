"""The benchmark's workloads: real-size decoders, built from shapes only.

Every model runs its layers under ``nnx.scan`` (as MaxText and the Flax guides do at
these sizes), so each block parameter has a leading layer dimension. A workload can
also be built with full rematerialisation (``jax.checkpoint`` on each layer, nothing
saved: MaxText's default ``remat_policy: 'full'``), which the hand plans use where the
model does not fit otherwise. State and batch are ``jax.ShapeDtypeStruct``s
(``jax.eval_shape``): nothing is initialised or allocated.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from autoshard.models import gpt, llama
from autoshard.models.common import Setup, abstract_setup, setup_model


def _stacked(block_cls, config, rngs: nnx.Rngs):
    """One block whose every parameter has a leading ``n_layers`` dimension."""

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs):
        return block_cls(config, rngs)

    return make(rngs)


# The layout of the residual stream at each layer's input, when a hand plan fixes
# one (jax.lax.with_sharding_constraint, as MaxText constrains its decoder layers'
# inputs); None leaves it to the compiler. Read while the step is traced.
CARRY_SHARDING: contextvars.ContextVar = contextvars.ContextVar("carry_sharding", default=None)


@contextlib.contextmanager
def carry_sharding(sharding):
    """Trace steps under this with the residual stream constrained to ``sharding``."""
    token = CARRY_SHARDING.set(sharding)
    try:
        yield
    finally:
        CARRY_SHARDING.reset(token)


def _run(blocks, x: jax.Array, remat: bool) -> jax.Array:
    """The residual stream through the stacked blocks, one ``nnx.scan`` step a layer."""
    sharding = CARRY_SHARDING.get()

    def layer(x, block):
        if sharding is not None:
            x = jax.lax.with_sharding_constraint(x, sharding)
        return block(x)

    if remat:
        layer = nnx.remat(layer)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
        return layer(x, block)

    return run(x, blocks)


class ScanGPT(nnx.Module):
    """:class:`autoshard.models.gpt.GPT` with its blocks stacked and scanned."""

    remat = False

    def __init__(self, config: gpt.GPTConfig, rngs: nnx.Rngs):
        self.tok_embed = nnx.Embed(config.vocab, config.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(config.seq_len, config.d_model, rngs=rngs)
        self.blocks = _stacked(gpt.Block, config, rngs)
        self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)
        self.head = nnx.Linear(config.d_model, config.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tok_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
        return self.head(self.ln_f(_run(self.blocks, x, self.remat)))


class ScanLlama(nnx.Module):
    """:class:`autoshard.models.llama.Llama` with its blocks stacked and scanned."""

    remat = False
    loss_chunk = 0  # `llama.loss_fn` computes the logits whole

    def __init__(self, config: llama.LlamaConfig, rngs: nnx.Rngs):
        dt = config.jnp_dtype
        self.embed = nnx.Embed(config.vocab, config.d_model, dtype=dt, param_dtype=dt, rngs=rngs)
        self.blocks = _stacked(llama.Block, config, rngs)
        self.norm = llama.RMSNorm(config.d_model, config.norm_eps, dt)
        self.head = nnx.Linear(
            config.d_model, config.vocab, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.norm(_run(self.blocks, self.embed(tokens), self.remat)))


class ScanGPTRemat(ScanGPT):
    remat = True


class ScanLlamaRemat(ScanLlama):
    remat = True


_MODELS = {
    ("gpt", False): (ScanGPT, gpt),
    ("gpt", True): (ScanGPTRemat, gpt),
    ("llama", False): (ScanLlama, llama),
    ("llama", True): (ScanLlamaRemat, llama),
}


@dataclass(frozen=True)
class Workload:
    """A named train step at one size.

    Attributes:
      name: the label in the tables.
      family: ``"gpt"`` or ``"llama"``.
      config: the model's config.
      batch: sequences per step on 8 devices (pods scale it with the device count).
      hand_remat: the hand plans rematerialise every layer (MaxText's default
        ``remat_policy: 'full'``), for a model that fits no hand plan without it.
    """

    name: str
    family: str
    config: object
    batch: int
    hand_remat: bool = False

    @property
    def heads(self) -> int:
        return self.config.n_heads

    @property
    def kv_heads(self) -> int:
        return getattr(self.config, "n_kv_heads", self.config.n_heads)

    def setup(self, remat: bool = False, devices: int = 8) -> Setup:
        """Abstract (ShapeDtypeStruct) state and batch with the adamw train step;
        ``devices``: the batch is ``batch * devices / 8`` sequences."""
        model_cls, module = _MODELS[(self.family, remat)]
        batch = max(1, self.batch * devices // 8)

        def make(config, n):
            return setup_model(model_cls, module.loss_fn, module.synthetic_batch, config, n)

        return abstract_setup(make, self.config, batch)


def fresh(step):
    """A new function object for ``step``: jax caches a traced function by identity, so
    a step traced under one ``carry_sharding`` would otherwise be reused under another."""

    def train_step(state, batch):
        return step(state, batch)

    return train_step


def _gpt(d: int, layers: int, heads: int, ff: int, seq: int, vocab: int = 50304):
    return gpt.GPTConfig(
        vocab=vocab, d_model=d, n_heads=heads, n_layers=layers, seq_len=seq, d_ff=ff
    )


LLAMA_7B = llama.LlamaConfig(
    vocab=32000, d_model=4096, n_heads=32, n_kv_heads=8, n_layers=32, seq_len=2048, d_ff=11008
)
REAL: list[Workload] = [
    Workload("GPT-2 small", "gpt", _gpt(768, 12, 12, 3072, 1024), 16),
    Workload("GPT-2 medium", "gpt", _gpt(1024, 24, 16, 4096, 1024), 16),
    Workload("GPT 1.3B", "gpt", _gpt(2048, 24, 16, 8192, 2048), 16),
    Workload("Llama-7B shape", "llama", LLAMA_7B, 8, hand_remat=True),
]

# The same code path at sizes a test compiles in a second or two.
TINY: list[Workload] = [
    Workload("tiny GPT", "gpt", _gpt(64, 2, 4, 256, 32, vocab=256), 16),
    Workload(
        "tiny Llama",
        "llama",
        dataclasses.replace(llama.tiny(), n_layers=2, seq_len=32),
        16,
        hand_remat=True,
    ),
]


def by_name(names: str, pool: list[Workload]) -> list[Workload]:
    """Workloads whose names contain one of the comma-separated ``names`` (case-insensitive)."""
    want = [n.strip().lower() for n in names.split(",") if n.strip()]
    out = [w for w in pool if any(n in w.name.lower() for n in want)]
    if not out:
        raise SystemExit(f"no workload matches {names!r}: {', '.join(w.name for w in pool)}")
    return out

