"""metarl-jax: meta-reinforcement learning compiled end to end with JAX."""

import os

__version__ = "0.1.0"

# XLA's CPU runtime can deadlock under its concurrency-optimised scheduler: with JAX
# 0.10.2, a rollout of the Brax `generalized` ant driven by a ReLU policy with per-task
# weights (GMPS's post-update phase on the ant ring, 800 or more episodes) never
# completes; every XLA thread waits and no CPU is used (experiments/README.md, "The XLA
# CPU stall"). The default scheduler runs it, and is as fast on our benchmarks. The flag
# has to be in XLA_FLAGS before JAX creates its CPU client, so it is added when
# metarl_jax is imported; a value the user set in XLA_FLAGS is left alone. It names a CPU
# option only, which GPU and TPU compilations ignore.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _add_xla_workaround_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()


_add_xla_workaround_flags()
