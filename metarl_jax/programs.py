"""The compiled programs of a run: `iterations_per_call` meta-iterations fused with
`lax.scan` into one XLA program, traced under the task sharding, with an in-graph count
of non-finite parameters; plus the memory check made before compiling them.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from metarl_jax import distributed
from metarl_jax.config import ConfigError

# Of several non-finite quantities, a divergence names the first of these that is.
REPORTED_FIRST = ("outer_loss", "pre_return", "post_return", "nonfinite_params")


def with_finiteness_check(meta_iteration):
    """Adds the count of non-finite parameter entries to the metrics, in-graph."""

    def checked(state):
        state, metrics = meta_iteration(state)
        leaves = jax.tree.leaves(state.params)
        metrics["nonfinite_params"] = sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)
        return state, metrics

    return checked


def poison(state):
    """Test-only fault injection: θ full of NaN, so the next iteration diverges."""
    return state.replace(params=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                             state.params))


def first_nonfinite(metrics: dict) -> str | None:
    """The metric to blame for a divergence (`REPORTED_FIRST` order), or None."""
    bad = sorted((k for k, v in metrics.items()
                  if not math.isfinite(v) or (k == "nonfinite_params" and v > 0)),
                 key=lambda k: (REPORTED_FIRST.index(k) if k in REPORTED_FIRST
                                else len(REPORTED_FIRST), k))
    return bad[0] if bad else None


class IterationPrograms:
    """One compiled program per call length: `iterations_per_call`, and the shorter
    ones where a call is cut by the end of the run or by a checkpoint. All are compiled
    by `compile_for` before the host loop starts, so nothing compiles inside it (but
    the one-iteration program a divergence inside a fused call replays with)."""

    def __init__(self, algorithm, run, sharding):
        self.run = run
        self.sharding = sharding
        self.replicated = distributed.replicated(sharding)
        checked = with_finiteness_check(algorithm.meta_iteration)
        if run.debug_nan_at_iteration is not None:
            unplanted = checked

            def checked(state):  # planted in-graph, so it works inside any call
                state = jax.lax.cond(state.iteration + 1 == run.debug_nan_at_iteration,
                                     poison, lambda s: s, state)
                return unplanted(state)
        self._iteration = checked
        self._compiled = {}

    def call_length(self, iteration: int) -> int:
        """Iterations in the call starting at `iteration`: `iterations_per_call`, cut at
        the end of the run and at the next checkpoint."""
        run = self.run
        return min(run.iterations_per_call, run.iterations - iteration + 1,
                   run.checkpoint_every - (iteration - 1) % run.checkpoint_every)

    def calls(self, first_iteration: int):
        """(first iteration, length) of every call from `first_iteration` to the end."""
        iteration = first_iteration
        while iteration <= self.run.iterations:
            length = self.call_length(iteration)
            yield iteration, length
            iteration += length

    def compile_for(self, first_iteration: int, state) -> None:
        for _, length in self.calls(first_iteration):
            self.program(length, state)

    def program(self, length: int, state=None):
        if length not in self._compiled:
            iteration = self._iteration

            def fused(state):
                return jax.lax.scan(lambda carry, _: iteration(carry), state, None,
                                    length=length)

            # Traced under the mesh: the task axis is split over the devices, the state
            # stays replicated (so every call takes the same layout).
            with distributed.use_task_sharding(self.sharding):
                self._compiled[length] = jax.jit(
                    iteration if length == 1 else fused, in_shardings=self.replicated,
                    out_shardings=self.replicated).lower(state).compile()
        return self._compiled[length]

    def __call__(self, state, length: int):
        """Runs `length` iterations from `state` → (state, metrics with a leading
        [length] axis when length > 1)."""
        return self._compiled[length](state)

    def replay(self, state, iterations: int):
        """`state` advanced by `iterations` single-iteration calls (the state before a
        bad iteration inside a fused call)."""
        for _ in range(iterations):
            state = self.program(1, state)(state)[0]
        return state


# --- memory ----------------------------------------------------------------------------

def phase_bytes(config, env) -> int:
    """A rough upper estimate of what one sampling phase holds: per transition, the
    stored trajectory fields and the policy's activations kept for the gradients, in
    float32, for the K + 1 phases of an iteration."""
    c = config
    transitions = c.meta_batch_size * c.episodes_per_task * c.horizon * (c.inner_steps + 1)
    floats = (env.observation_size + 3 * env.action_size + 10
              + 4 * sum(c.hidden_sizes))
    return transitions * floats * 4


def available_bytes(device) -> int | None:
    """Memory the device can give a program: the accelerator's limit, or on the CPU the
    host's available memory; None when unknown."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_memory(config, env, sharding) -> None:
    """Raises ConfigError, before anything is compiled, when the estimated memory of a
    meta-iteration's sampling (`phase_bytes`, split over the task devices) exceeds what
    the device has."""
    devices = np.asarray(sharding.mesh.devices).reshape(-1)
    # A split CPU's devices share the host's memory; accelerators have their own.
    shares = 1 if devices[0].platform == "cpu" else len(devices)
    per_device = phase_bytes(config, env) / shares
    available = available_bytes(devices[0])
    if available is None or per_device <= available:
        return
    c = config
    raise ConfigError(
        f"config: meta_batch_size, episodes_per_task, horizon: M={c.meta_batch_size}, "
        f"N={c.episodes_per_task}, H={c.horizon} (K={c.inner_steps}) need about "
        f"{per_device / 2**30:.3g} GiB per device for sampling, and "
        f"{devices[0].platform} device 0 has {available / 2**30:.3g} GiB available; "
        "reduce M, N or H")
