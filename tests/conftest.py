"""Test setup: 8 emulated CPU devices and exact fp32 matmuls, before jax starts."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
