"""Test setup: 8 emulated CPU devices and exact fp32 matmuls, before jax starts."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import os  # noqa: E402

# Plans are not kept on disk during tests (the plan-cache tests pass a tmp dir).
os.environ.setdefault("AUTOSHARD_CACHE", "0")
