"""Test setup: 8 fake CPU devices, full-precision float32 matmuls, and fast XLA:CPU compiles.

The two compile flags cut the CPU compile time of the tiny train step (with CG-DETR and its
in-graph matcher) from ~70 s to ~16 s; they change how XLA:CPU emits code, not the numerics.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_cpu_use_fusion_emitters=false",
          "--xla_backend_optimization_level=0")
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing] + [f for f in _FLAGS if f.split("=")[0] not in _existing]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
