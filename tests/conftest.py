"""Shared test set-up: a persistent XLA compilation cache and session-wide compiled objects.

Expensive compilations (a ProMP meta-iteration on each environment) are built once per
session in fixtures and reused by every test that needs them.
"""

import os
import pathlib

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
