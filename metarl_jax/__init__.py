"""metarl-jax: meta-reinforcement learning compiled end to end with JAX."""

import os
import re

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


# XLA's CPU runtime can also deadlock when the host CPU is split into several devices
# (`--cpu-devices`, jax_num_cpu_devices, --xla_force_host_platform_device_count). All
# devices share one intra-op thread pool, sized to the cores. jaxlib's batched LAPACK
# kernels (the Cholesky factorisation and triangular solves behind Brax's `generalized`
# mass matrix and the baseline's least squares), called from a thread of that pool, hand
# their batch to the same pool in chunks and block until the chunks are done; when every
# thread of the pool is such a caller, no thread is left to run a chunk and nothing moves
# again (JAX 0.10.2; one device per core leaves exactly one caller per thread). XLA sizes
# the pool from PJRT_NPROC (or NPROC) when set, so a split CPU gets one extra thread per
# device on top of the cores, which lets the chunks run while each device has a kernel
# waiting. It is a margin, not a proof: a program that keeps more batched LAPACK calls in
# flight than the margin can still stall (metarl_jax.watchdog reports such a stall).
# Setting PJRT_NPROC or NPROC yourself turns this off. The extra threads change the
# rounding of the split runs (work is partitioned by thread count) but not their speed
# (benchmarks/RESULTS.md); a single device is left as it is.
CPU_POOL_ENV = "PJRT_NPROC"
_POOL_ENVS = ("PJRT_NPROC", "NPROC")


def host_cores() -> int:
    """The cores this process may run on (what XLA sizes its thread pool by)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def reserve_cpu_threads(num_devices: int) -> None:
    """Sizes XLA's CPU thread pool for a host CPU split into `num_devices` devices:
    the cores plus one thread per device. Has effect only before JAX creates its CPU
    client; does nothing for one device or when the user sized the pool."""
    if num_devices <= 1 or any(name in os.environ for name in _POOL_ENVS):
        return
    os.environ[CPU_POOL_ENV] = str(host_cores() + num_devices)


def cpu_devices_from_environment() -> int | None:
    """The CPU device count the environment asks JAX for (XLA_FLAGS'
    --xla_force_host_platform_device_count, JAX_NUM_CPU_DEVICES; the larger), or None."""
    counts = []
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                      os.environ.get("XLA_FLAGS", ""))
    if match:
        counts.append(int(match.group(1)))
    if os.environ.get("JAX_NUM_CPU_DEVICES", "").strip().isdigit():
        counts.append(int(os.environ["JAX_NUM_CPU_DEVICES"]))
    return max(counts) if counts else None


_add_xla_workaround_flags()
reserve_cpu_threads(cpu_devices_from_environment() or 1)
