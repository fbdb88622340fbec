"""Shared test set-up: a persistent XLA compilation cache and session-wide compiled objects.

Expensive compilations (a ProMP meta-iteration on each environment) are built once per
session in fixtures and reused by every test that needs them.
"""

import os
import pathlib

# Tests are compile-bound (a Brax rollout takes 10-20 s to compile and milliseconds to
# run), and LLVM's optimisation passes are most of the compile: skipping them halves it.
# Timings belong to benchmarks/, which run fully optimised.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
