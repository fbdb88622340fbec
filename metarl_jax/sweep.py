"""Seeds and hyperparameter sweeps as one compiled program.

A sweep is S runs that differ only in their seed and in numbers the program computes
with (step sizes, learning rates, KL coefficients and targets, clip ε, γ, λ, …). Their
training states are stacked on a leading run axis, their hyperparameters become [S]
arrays, and one `jax.vmap` of the meta-iteration advances every member at once: one
compilation, and S times the work per call for the accelerator. A key that changes
shapes or the program (M, N, H, K, hidden sizes, the algorithm, the task, a switch) is
refused before compiling, with the list of the keys that can be swept.

On devices, the task axis of every member is split over the mesh exactly as in a
single run (`metarl_jax.rollout.collect`), and the run axis stays whole on every device:
the members of a sweep share each device's work.

Every member gets an ordinary run directory under OUT (its own config.yaml,
metrics.jsonl, TensorBoard and checkpoints), so `metarl eval`, `metarl plot` and
`--resume` of a single member work unchanged; `OUT/sweep.json` lists the members. A
member whose metrics or parameters become non-finite is frozen and reported (its last
good iteration checkpointed) while the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metarl_jax import distributed, loggers, programs, run_dir, watchdog
from metarl_jax.checkpoints import Checkpointer
from metarl_jax.config import ConfigError, merge
from metarl_jax.run_config import RunConfig, build, resolve_config
from metarl_jax.trainer import (Interrupted, StopSignals, Training, TrainingDiverged,
                                flatten_metrics)

SWEEP_INDEX = run_dir.SWEEP_INDEX
# Run settings a sweep may vary per member, beside the algorithm's numbers.
RUN_KEYS = ("seed", "debug_nan_at_iteration")


# --- the grid ---------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """"0,1,2" or "0-4" (inclusive) or a mix: "0-2,7"."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                low, high = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds.extend(range(int(low), int(high) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"config: --seeds: {text!r}; expected integers and ranges, "
                          "e.g. 0,1,2 or 0-4") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"config: --seeds: {text!r}; expected distinct seeds")
    return seeds


def parse_sweep(items) -> dict[str, list]:
    """["inner_lr=0.05,0.1", "kl_coeff=1e-4,1e-3"] → {"inner_lr": [0.05, 0.1], ...}."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"config: --sweep: {item!r}; expected KEY=V1,V2,...")
        parsed = [yaml.safe_load(v) for v in values.split(",")]
        if key in grid:
            raise ConfigError(f"config: --sweep: {key} given twice")
        grid[key.strip()] = parsed
    return grid


def sweepable_keys(config: RunConfig) -> list[str]:
    """The keys a sweep may vary: `RUN_KEYS` and every float of the algorithm's config
    (dotted inside sections, e.g. gmps.step_size_init)."""
    keys = list(RUN_KEYS)

    def floats(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                floats(hints[f.name], prefix + f.name + ".")
            elif hints[f.name] is float:
                keys.append(prefix + f.name)

    floats(type(config.algorithm), "")
    return keys


def _nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _get(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _replace(config, key: str, value):
    head, _, rest = key.partition(".")
    if rest:
        return dataclasses.replace(config, **{head: _replace(getattr(config, head), rest, value)})
    return dataclasses.replace(config, **{head: value})


@dataclasses.dataclass(frozen=True)
class Member:
    name: str  # its run directory under the sweep's OUT
    setting: dict  # the swept keys' values, seed included
    config: RunConfig


def expand(raw: dict, seeds: list[int] | None, grid: dict[str, list]) -> list[Member]:
    """The members of a sweep: every combination of `grid` (the product, in the order
    given) for every seed. Each member's configuration is resolved and validated as a
    single run's would be; a key that cannot be swept is refused here."""
    base = resolve_config(raw)
    allowed = sweepable_keys(base)
    for key in grid:
        if key not in allowed:
            raise ConfigError(
                f"config: --sweep: {key} changes the program's shapes or structure and "
                f"cannot be swept; sweepable for {base.run.algo}: {', '.join(allowed)}")
    for key, values in grid.items():
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"config: --sweep: {key}: a value is given twice")
    if "seed" in grid and seeds is not None:
        raise ConfigError("config: --sweep: seed: give the seeds with --seeds")
    seeds = grid.pop("seed", None) or seeds or [base.run.seed]
    members = []
    for values in itertools.product(*grid.values()):
        for seed in seeds:
            setting = dict(zip(grid, values))
            overrides: dict = {"seed": seed}
            for key, value in setting.items():
                overrides = merge(overrides, _nested(key, value))
            config = resolve_config(merge(raw, overrides))
            name = "_".join([f"{k}={v}" for k, v in setting.items()] + [f"seed{seed}"])
            members.append(Member(name=name, setting={**setting, "seed": seed},
                                  config=config))
    return members


# --- the program ------------------------------------------------------------------------

def members_per_batch(sweep_batch: int | None, count: int, sharding) -> int:
    """How many members one step of the program computes at once: `sweep_batch` when
    set, else every member on an accelerator (they fill it together) and one at a time
    on a CPU, where a run already keeps the cores busy and a vmapped member axis turns
    the policy's matrix products into batched ones that XLA's CPU backend runs slowly
    (benchmarks/sweep.py)."""
    if sweep_batch is not None:
        return min(sweep_batch, count)
    platform = np.asarray(sharding.mesh.devices).reshape(-1)[0].platform
    return 1 if platform == "cpu" else count


class SweepPrograms:
    """The vmapped meta-iteration of a sweep, compiled once per call length.

    Inside the traced function each member's algorithm is built from the base
    configuration with its swept numbers as traced scalars, so the same program serves
    every member; an `active` mask freezes members that diverged.
    """

    def __init__(self, members: list[Member], sharding):
        base = members[0].config
        self.run = base.run
        self.sharding = sharding
        self.replicated = distributed.replicated(sharding)
        self.env, self.policy, self.algorithm = build(base)
        self.keys = [k for k in sweepable_keys(base) if k not in RUN_KEYS
                     and len({_get(m.config.algorithm, k) for m in members}) > 1]
        self.hypers = {k: jnp.asarray([_get(m.config.algorithm, k) for m in members],
                                      jnp.float32) for k in self.keys}
        self.nan_at = jnp.asarray([m.config.run.debug_nan_at_iteration or 0 for m in members],
                                  jnp.int32)
        self.members_per_batch = members_per_batch(base.run.sweep_batch, len(members),
                                                   sharding)
        self._compiled = {}

    def member_iteration(self, state, hyper, nan_at):
        config = self.algorithm.config
        for key, value in hyper.items():
            config = _replace(config, key, value)
        algorithm = type(self.algorithm)(config, self.env, self.policy)
        state = jax.lax.cond(state.iteration + 1 == nan_at, programs.poison,
                             lambda s: s, state)
        return programs.with_finiteness_check(algorithm.meta_iteration)(state)

    def iteration(self, states, active):
        members = (states, self.hypers, self.nan_at)
        if self.members_per_batch >= len(self.nan_at):
            new_states, metrics = jax.vmap(self.member_iteration)(*members)
        else:  # one member (a plain scan) or one vmapped batch of them after another
            batch = None if self.members_per_batch == 1 else self.members_per_batch
            new_states, metrics = jax.lax.map(lambda m: self.member_iteration(*m), members,
                                              batch_size=batch)

        def keep(new, old):
            return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        return jax.tree.map(keep, new_states, states), metrics

    def check_traceable(self, states, active) -> None:
        """Traces (does not compile) the program: a swept key the algorithm branches on
        in Python is refused here, naming it."""
        try:
            with distributed.use_task_sharding(self.sharding):
                jax.eval_shape(self.iteration, states, active)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                jax.errors.TracerIntegerConversionError):
            raise ConfigError(
                f"config: --sweep: {', '.join(self.keys)}: {self.run.algo} decides its "
                "program on one of these values, so they cannot be swept; run them as "
                "separate runs") from None

    def call_length(self, iteration: int) -> int:
        return programs.IterationPrograms.call_length(self, iteration)

    def calls(self, first_iteration: int):
        return programs.IterationPrograms.calls(self, first_iteration)

    def program(self, length: int, states, active):
        if length not in self._compiled:
            def fused(states, active):
                return jax.lax.scan(lambda carry, _: self.iteration(carry, active), states,
                                    None, length=length)

            with distributed.use_task_sharding(self.sharding):
                self._compiled[length] = jax.jit(
                    self.iteration if length == 1 else fused,
                    in_shardings=self.replicated, out_shardings=self.replicated,
                ).lower(states, active).compile()
        return self._compiled[length]


def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _member(states, index: int):
    return jax.tree.map(lambda x: x[index], states)


# --- the host loop ----------------------------------------------------------------------

def write_index(out_dir: str, members: list[Member], grid_keys: list[str],
                diverged: dict | None = None) -> None:
    """OUT/sweep.json: the swept keys, every member's name and setting, and the
    members that diverged (name: iteration)."""
    index = {"swept": grid_keys,
             "members": [{"name": m.name, "setting": m.setting} for m in members],
             "diverged": diverged or {}}
    path = os.path.join(out_dir, SWEEP_INDEX)
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=2)
    os.replace(path + ".tmp", path)


def read_index(out_dir: str) -> dict:
    path = os.path.join(out_dir, SWEEP_INDEX)
    if not os.path.exists(path):
        raise ConfigError(f"config: --resume: {out_dir} holds no sweep (no {SWEEP_INDEX})")
    with open(path) as f:
        return json.load(f)


def member_dirs(out_dir: str) -> list[str]:
    return [os.path.join(out_dir, m["name"]) for m in read_index(out_dir)["members"]]


def load_members(out_dir: str, iterations: int | None = None) -> list[Member]:
    """The members of the sweep in `out_dir`, from their saved configurations."""
    members = []
    for entry in read_index(out_dir)["members"]:
        raw = run_dir.read_config_dict(os.path.join(out_dir, entry["name"]))
        if iterations is not None:
            raw["iterations"] = iterations
        members.append(Member(name=entry["name"], setting=entry["setting"],
                              config=resolve_config(raw)))
    return members


def train_sweep(members: list[Member], out_dir: str, force: bool = False,
                resume: bool = False, progress: bool = True,
                log=print) -> list[Training]:
    """Trains every member in one compiled program; returns each member's records of
    this call and final state (a diverged member's: the last good one). Members that
    diverge stop alone: reported through `log`, their last good iteration checkpointed,
    and named in the index so that a resume leaves them stopped. Raises Preempted /
    Interrupted as `train` does, after checkpointing every member, and TrainingDiverged
    when every member diverged."""
    if jax.process_count() > 1:
        raise ConfigError("config: --seeds/--sweep: sweeps run in a single process")
    run = members[0].config.run
    count = len(members)
    loggers.check_available(run.logger)
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(StopSignals())
        os.makedirs(out_dir, exist_ok=True)
        stack.enter_context(run_dir.RunLock(out_dir))
        dirs = [os.path.join(out_dir, m.name) for m in members]
        for path in dirs:  # every lock first: a refusal leaves every directory as it was
            os.makedirs(path, exist_ok=True)
            stack.enter_context(run_dir.RunLock(path))
        checkpointers = []
        for member, path in zip(members, dirs):
            if not resume:
                run_dir.prepare_output_dir(path, force)
                run_dir.write_config(path, member.config.to_dict())
            checkpointer = Checkpointer(os.path.join(path, run_dir.CHECKPOINT_DIR),
                                        max_to_keep=run.keep_checkpoints)
            stack.callback(checkpointer.close)
            checkpointers.append(checkpointer)
        diverged_at = read_index(out_dir).get("diverged", {}) if resume else {}
        swept = [k for k in members[0].setting if k != "seed"]
        if not resume:
            write_index(out_dir, members, swept)

        sharding = distributed.sharding_for_tasks(
            members[0].config.algorithm.meta_batch_size, run.devices)
        compiled = SweepPrograms(members, sharding)
        # The members' phases are in memory together: M·S tasks' worth.
        memory_config = dataclasses.replace(
            members[0].config.algorithm,
            meta_batch_size=members[0].config.algorithm.meta_batch_size * count)
        programs.check_memory(memory_config, compiled.env, sharding)

        # Each member's own initial state and host-side preparation, then stacked.
        algorithms = [build(m.config)[2] for m in members]
        states = [a.init(jax.random.PRNGKey(m.config.run.seed))
                  for a, m in zip(algorithms, members)]
        active = np.array([m.name not in diverged_at for m in members])
        # Traced (not compiled) on the initial states, before any expert is trained.
        compiled.check_traceable(_stack(states), jnp.asarray(active))
        first_iteration, env_steps, elapsed_before = 1, [0] * count, [0.0] * count
        if resume:
            states, first_iteration, env_steps, elapsed_before = _restore_members(
                members, dirs, checkpointers, states, algorithms, active)
        if first_iteration == 1:
            states = [a.prepare(s, m.config.run.seed)
                      for a, s, m in zip(algorithms, states, members)]
        stacked = jax.device_put(_stack(states), compiled.replicated)
        active_mask = jax.device_put(jnp.asarray(active), compiled.replicated)

        start = time.perf_counter()
        for _, length in compiled.calls(first_iteration):
            compiled.program(length, stacked, active_mask)
        logs = []
        for member, path in zip(members, dirs):
            if resume:
                run_dir.truncate_metrics(path, first_iteration - 1)
            logs.append(run_dir.MetricsLog(path, first_iteration, run.logger,
                                           member.config.to_dict(), resume))
            stack.callback(logs[-1].close)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.iterations, initial=first_iteration - 1, unit="it",
                       dynamic_ncols=True)
            stack.callback(bar.close)

        per_step = algorithms[0].env_steps_per_iteration
        histories = [[] for _ in members]

        def save(index, iteration, state, elapsed):
            checkpointer = checkpointers[index]
            if iteration > 0 and (checkpointer.latest_iteration() or 0) < iteration:
                steps = env_steps[index] + (iteration - first_iteration + 1) * per_step
                with signals.saving():
                    checkpointer.save(iteration, state, {
                        "env_steps": steps, "time_s": elapsed,
                        "algorithm": algorithms[index].host_state()})

        def save_active(iteration, states):
            for index in np.flatnonzero(active):
                if histories[index]:
                    save(index, iteration, _member(states, index),
                         histories[index][-1]["time_s"])

        dog = watchdog.Watchdog()
        last_done = first_iteration - 1
        completed = None  # (iteration, stacked states) after the last logged call
        if signals.stop_requested():
            signals.check(last_done, out_dir)
        try:
            for call_start, length in compiled.calls(first_iteration):
                if not active.any():
                    break
                tick = time.perf_counter()
                call_input = stacked
                with dog.watch(f"sweep call (iterations {call_start}-"
                               f"{call_start + length - 1})"):
                    stacked, device_metrics = compiled.program(length, stacked, active_mask)(
                        stacked, active_mask)
                    host_metrics = jax.device_get(device_metrics)
                per_iteration_s = (time.perf_counter() - tick) / length
                diverged_now = []
                for index in np.flatnonzero(active):
                    for offset in range(length):
                        metrics = flatten_metrics(jax.tree.map(
                            lambda x, i=index, o=offset: x[o, i] if length > 1 else x[i],
                            host_metrics))
                        quantity = programs.first_nonfinite(metrics)
                        iteration = call_start + offset
                        if quantity is not None:
                            good = call_input
                            for _ in range(offset):
                                good = compiled.program(1, good, active_mask)(
                                    good, active_mask)[0]
                            save(index, iteration - 1, _member(good, index),
                                 elapsed_before[index] + tick + offset * per_iteration_s
                                 - start)
                            diverged_now.append((index, iteration, good))
                            name = "parameters" if quantity == "nonfinite_params" else quantity
                            log(f"warning: member {members[index].name} diverged at "
                                f"iteration {iteration}: {name} non-finite "
                                f"({metrics[quantity]}); its last good checkpoint is "
                                f"iteration {iteration - 1}; the others go on")
                            break
                        del metrics["nonfinite_params"]
                        record = {
                            "iteration": iteration,
                            "env_steps": env_steps[index] + (iteration - first_iteration + 1)
                            * per_step,
                            "time_s": elapsed_before[index] + tick + (offset + 1)
                            * per_iteration_s - start,
                            "iteration_s": per_iteration_s, "devices": sharding.mesh.size,
                            **algorithms[index].host_state(), **metrics}
                        histories[index].append(record)
                        logs[index].write(record)
                for index, iteration, good in diverged_now:
                    active[index] = False
                    diverged_at[members[index].name] = iteration
                    # Its slot holds the last good state from here on, not NaN.
                    stacked = jax.tree.map(lambda s, g, i=index: s.at[i].set(g[i]),
                                           stacked, good)
                if diverged_now:
                    write_index(out_dir, members, swept, diverged_at)
                    active_mask = jax.device_put(jnp.asarray(active), compiled.replicated)
                last_done = call_start + length - 1
                completed = (last_done, stacked)
                stop = signals.stop_requested()
                if last_done % run.checkpoint_every == 0 or last_done == run.iterations \
                        or stop:
                    save_active(last_done, stacked)
                if bar is not None:
                    bar.set_postfix(active=f"{int(active.sum())}/{count}")
                    bar.update(length)
                if stop:
                    signals.check(last_done, out_dir)
        except KeyboardInterrupt:  # a second Ctrl-C: keep what the last call computed
            if completed is not None:
                save_active(*completed)
            raise Interrupted(f"interrupted after iteration {last_done}") from None
    if not active.any():
        raise TrainingDiverged("every member of the sweep diverged: "
                               + ", ".join(f"{name} at iteration {it}"
                                           for name, it in diverged_at.items()))
    return [Training(history=h, state=_member(stacked, i)) for i, h in enumerate(histories)]


def _restore_members(members, dirs, checkpointers, states, algorithms, active):
    """Every member from its checkpoint: the running ones all at one iteration (the
    sweep advances in lockstep), the diverged ones at their last good one. Returns
    (states, first iteration, env_steps, elapsed seconds)."""
    found = []
    for checkpointer, state, path in zip(checkpointers, states, dirs):
        try:
            found.append(checkpointer.restore_latest_intact(state))
        except Exception as error:
            raise run_dir.RunDirectoryError(f"{path}: {error}") from None
    running = {members[i].name: (found[i][0] if found[i] else 0)
               for i in np.flatnonzero(active)}
    if len(set(running.values())) > 1:
        behind = min(running.values())
        raise run_dir.RunDirectoryError(
            "the sweep's members are at different iterations ("
            + ", ".join(f"{name}: {it}" for name, it in running.items())
            + f"); resume the ones at {behind} on their own (metarl train --resume "
            "OUT/MEMBER --iterations N) up to the others, then resume the sweep")
    resume_at = next(iter(running.values()), 0)
    restored, env_steps, elapsed = [], [], []
    for f, state, algorithm in zip(found, states, algorithms):
        if f is None:
            restored.append(state)
            env_steps.append(0)
            elapsed.append(0.0)
            continue
        _, member_state, host = f
        algorithm.load_host_state(host.get("algorithm", {}))
        restored.append(member_state)
        env_steps.append(int(host["env_steps"]))
        elapsed.append(float(host["time_s"]))
    frozen = [members[i].name for i in np.flatnonzero(~active)]
    if frozen:
        print(f"note: {', '.join(frozen)} diverged before and stay stopped", file=sys.stderr)
    return restored, resume_at + 1, env_steps, elapsed
