"""Scaling out on JAX's own runtime: the task axis sharded over a device mesh.

Every meta-learner's program has one natural parallel axis, the M tasks of a meta-batch:
sampling, advantages and inner adaptation are independent per task, and the outer loss
averages over tasks. `task_sharding(n)` builds a one-axis mesh ("tasks") over n devices;
while it is active (`use_task_sharding`), the programs traced place the task axis of the
sampled tasks, and so of everything computed from them, across the devices
(`jax.lax.with_sharding_constraint`), and XLA inserts the reduction of the outer loss.
Parameters stay replicated. The numbers equal the single-device run up to
floating-point reassociation.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import metarl_jax
from metarl_jax.config import ConfigError

TASK_AXIS = "tasks"
_active: NamedSharding | None = None


def task_sharding(num_devices: int | None = None) -> NamedSharding:
    """A sharding of a leading task axis over the first `num_devices` devices (all
    devices, of every process, by default)."""
    devices = jax.devices()
    count = len(devices) if num_devices is None else num_devices
    if count < 1 or count > len(devices):
        raise ConfigError(f"config: devices: {count} requested, {len(devices)} available")
    mesh = Mesh(np.array(devices[:count]), (TASK_AXIS,))
    return NamedSharding(mesh, PartitionSpec(TASK_AXIS))


@contextlib.contextmanager
def use_task_sharding(sharding: NamedSharding | None):
    """Programs traced inside this context shard their task axis with `sharding`."""
    global _active
    previous, _active = _active, sharding
    try:
        yield
    finally:
        _active = previous


def split_cpu(num_devices: int) -> None:
    """Makes the host CPU appear to JAX as `num_devices` devices, so that the task
    sharding spreads a meta-batch over them: on a CPU-only machine, one device per core
    can keep the cores busier than XLA's own threading (measured in
    benchmarks/RESULTS.md). Also gives XLA's CPU thread pool one thread per device beyond
    the cores (`metarl_jax.reserve_cpu_threads`), without which batched LAPACK kernels
    can deadlock the devices. Must be called before JAX runs anything."""
    if num_devices < 1:
        raise ConfigError(f"config: cpu_devices: {num_devices}; expected at least 1")
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError as error:
        raise ConfigError("config: cpu_devices: JAX has already started its CPU backend; "
                          "split the CPU before running anything") from error
    # One more thread per device in XLA's CPU pool, against the LAPACK deadlock of a
    # split CPU (metarl_jax/__init__.py); read when the CPU client is created, later.
    metarl_jax.reserve_cpu_threads(num_devices)


def split_cpu_per_core() -> int | None:
    """What `metarl train` does without `--cpu-devices`: the host CPU split into one
    device per core (`split_cpu`), the fastest choice on a CPU-only machine for every
    task measured (benchmarks/RESULTS.md). It touches only JAX's CPU platform, so on a
    host with an accelerator, whose devices the programs run on, it changes nothing.
    Leaves the CPU as it is, and returns None, on a single core, when the user chose a
    count (XLA_FLAGS, JAX_NUM_CPU_DEVICES) or when JAX has already started; otherwise
    returns the number of devices."""
    if metarl_jax.cpu_devices_from_environment() is not None:
        return None
    cores = metarl_jax.host_cores()
    if cores <= 1:
        return None
    try:
        split_cpu(cores)
    except ConfigError:  # JAX already runs (a notebook, an in-process test): as it is
        return None
    return cores


def sharding_for_tasks(meta_batch_size: int, num_devices: int | None = None
                       ) -> NamedSharding:
    """The task sharding of a run: over `num_devices` devices when given (which must
    divide the meta-batch); by default over as many of this process's devices as divide
    the meta-batch evenly (all of them when they do). A run of several processes needs
    every device, so there the default is all of them, and they must divide it."""
    if num_devices is None and jax.process_count() == 1:
        available = len(jax.devices())
        num_devices = max(count for count in range(1, available + 1)
                          if meta_batch_size % count == 0)
    sharding = task_sharding(num_devices)
    check_divisible(meta_batch_size, sharding)
    return sharding


def shard_tasks(tree):
    """Constrains the leading (task) axis of every leaf of `tree` to the active task
    sharding; the identity when none is active or on a single device."""
    if _active is None or _active.mesh.size == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, _active), tree)


def replicated(sharding: NamedSharding) -> NamedSharding:
    """The same mesh, nothing split: for parameters, optimiser state and metrics."""
    return NamedSharding(sharding.mesh, PartitionSpec())


def check_divisible(meta_batch_size: int, sharding: NamedSharding) -> None:
    devices = sharding.mesh.size
    if meta_batch_size % devices:
        raise ConfigError(f"config: meta_batch_size: {meta_batch_size} tasks do not split "
                          f"evenly over {devices} devices; use a multiple of {devices}")


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process (just `flag` in a single process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins a multi-process run (`jax.distributed.initialize`), from the arguments or
    the environment variables METARL_COORDINATOR (host:port of process 0),
    METARL_NUM_PROCESSES and METARL_PROCESS_ID; does nothing when neither is given.
    On CPU the processes exchange data through gloo collectives."""
    import os

    coordinator = coordinator or os.environ.get("METARL_COORDINATOR")
    if coordinator is None:
        return
    num_processes = num_processes or int(os.environ["METARL_NUM_PROCESSES"])
    if process_id is None:
        process_id = int(os.environ["METARL_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
