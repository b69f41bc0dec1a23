"""Test setup: 8 fake CPU devices for sharding tests, fast compiles (set before JAX starts)."""

import os

# Tests are compile-bound (tiny shapes): a lower XLA backend optimisation level compiles ~5x
# faster and changes no test's outcome. Benchmarks never use these flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
