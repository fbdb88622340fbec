"""The host loop: resolve and validate the configuration, compile the meta-iteration
once, run it, and write metrics. Python only logs between compiled calls.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from metarl_jax import distributed
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.maml import MAML_VARIANTS
from metarl_jax.checkpoints import Checkpointer
from metarl_jax.config import (ConfigError, EnvConfig, at_least, build_dataclass, field, load_yaml,
                               merge, to_dict)
from metarl_jax.envs import lookup, make_env
from metarl_jax.policies import GaussianPolicy


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The keys of a run that are not the algorithm's hyperparameters."""

    algo: str = "promp"
    seed: int = 0
    iterations: int = field(1001, **at_least(1))
    env: EnvConfig = EnvConfig()
    devices: int | None = field(None, **at_least(1))  # None: every device
    checkpoint_every: int = field(50, **at_least(1))
    # Meta-iterations per compiled call (a `lax.scan`); must divide checkpoint_every.
    iterations_per_call: int = field(1, **at_least(1))
    keep_checkpoints: int = field(3, **at_least(1))
    # Test-only fault injection: θ is replaced by NaN before this iteration.
    debug_nan_at_iteration: int | None = field(None, **at_least(1))


# --- defaults: the task's published setting, the built-in experiment -------------------

# The algorithms of the ProMP paper's experiments, ProMP and its MAML-family baselines:
# they ran at the same per-task settings.
PROMP_PAPER = ("promp", *(variant.name for variant in MAML_VARIANTS))
EVERY = None  # an entry of PUBLISHED_SETTINGS that applies to every algorithm

# Per task distribution, the keys of its published setting that differ from the
# algorithm's own defaults, as (algorithms the entry applies to, keys) in order. The
# horizon is not here: it is the task distribution's own (`TaskEnv.horizon`, filled in
# when `horizon` is null). Everything else (N = 20 episodes, K = 1, α = 0.1, (64, 64)
# tanh policy, 1001 iterations, ProMP's P = 5, ε = 0.3, fixed KL 5e-4, TRPO's δ = 0.01 ...)
# is the algorithm's default.
_RAND_PARAMS = (  # ProMP HopperRandParams, WalkerRandParams
    (PROMP_PAPER, {"inner_lr": 0.05}),
    (("promp",), {"promp_steps": 3, "adaptive_kl": True, "kl_coeff": 1e-3}),  # target 0.01
)
_HUMANOID = ((EVERY, {"hidden_sizes": [128, 128]}),)  # ProMP HumanoidFwdBack, RandDir
_GMPS_RING = (  # GMPS ant locomotion: 40 tasks, 50 episodes per task, 2 × 100 ReLU
    (("gmps",), {"episodes_per_task": 50, "hidden_sizes": [100, 100], "activation": "relu"}),
)
PUBLISHED_SETTINGS: dict[str, tuple] = {
    "point-nav": ((EVERY, {"meta_batch_size": 20}),),  # MAML's and ProMP's 2D navigation
    "halfcheetah-dir": (),  # ProMP HalfCheetahFwdBack
    "halfcheetah-vel": (),  # MAML HalfCheetahVel
    "ant-dir": (),  # ProMP AntFwdBack
    "ant-dir2d": (),  # ProMP AntRandDir
    "ant-goal": ((PROMP_PAPER, {"inner_steps": 2}),),  # ProMP AntRandGoal
    "ant-goal-ring": _GMPS_RING,
    "ant-goal-ring-sparse": _GMPS_RING,
    "walker-dir": (),  # ProMP WalkerFwdBack
    "walker-vel": (),  # ProMP Walker2DRandVel
    "hopper-params": _RAND_PARAMS,
    "walker-params": _RAND_PARAMS,
    "humanoid-dir": _HUMANOID,
    "humanoid-dir2d": _HUMANOID,
}

# What a configuration naming neither `algo` nor `env` runs (`metarl train` with no
# flags): ProMP on 2D navigation at its published setting (M = 20, N = 20, H = 100), for
# 100 iterations instead of 1001. experiments/promp_point_nav.yaml (`make train`) writes
# the same run out.
DEFAULT_EXPERIMENT: dict[str, Any] = {"algo": "promp", "env": {"name": "point-nav"},
                                      "iterations": 100}


def published_setting(env_name: str, algo: str) -> dict:
    """The keys `env_name`'s published setting gives `algo` (see PUBLISHED_SETTINGS)."""
    setting: dict = {}
    for algorithms, keys in PUBLISHED_SETTINGS.get(env_name, ()):  # none for one's own task
        if algorithms is EVERY or algo in algorithms:
            setting = merge(setting, keys)
    return setting


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSettings
    algorithm: Any  # the algorithm's own config dataclass

    def to_dict(self) -> dict:
        """Flat form, as in the YAML files."""
        return {**to_dict(self.run), **to_dict(self.algorithm)}


def resolve_config(raw: dict) -> RunConfig:
    """Validates a flat configuration dict and fills every default.

    Precedence, lowest first: the algorithm's defaults; the task's published setting
    (`published_setting`; its horizon when `horizon` is null); `DEFAULT_EXPERIMENT` when
    `raw` names neither `algo` nor `env.name`; `raw` itself (the config file, the
    command-line flags and `--set`, merged in that order by the caller).

    Raises ConfigError (one line naming the field and the allowed values) on an unknown
    algorithm, environment or key, or a value of the wrong type or range. Nothing is
    built or compiled here.
    """
    if not isinstance(raw.get("env", {}), dict):
        raise ConfigError(f"config: env: expected a mapping, got {raw['env']!r}")
    if "algo" not in raw and "name" not in raw.get("env", {}):
        raw = merge(DEFAULT_EXPERIMENT, raw)
    algo = raw.get("algo", RunSettings.algo)
    if not isinstance(algo, str) or algo not in ALGORITHMS:
        raise ConfigError(f"config: algo: unknown algorithm {algo!r}; allowed: "
                          + ", ".join(sorted(ALGORITHMS)))
    env_name = raw.get("env", {}).get("name", EnvConfig.name)
    task = lookup(env_name)  # a registered task or module:attribute; ConfigError if neither
    raw = merge(published_setting(env_name, algo), raw)
    run_keys = {f.name for f in dataclasses.fields(RunSettings)}
    run = build_dataclass(RunSettings, {k: v for k, v in raw.items() if k in run_keys})
    if run.checkpoint_every % run.iterations_per_call:
        raise ConfigError(f"config: iterations_per_call: {run.iterations_per_call} does not "
                          f"divide checkpoint_every ({run.checkpoint_every}); use a divisor "
                          "of it")
    algorithm_class = ALGORITHMS[algo]
    algorithm_keys = [f.name for f in dataclasses.fields(algorithm_class.config_class)]
    unknown = sorted(set(raw) - run_keys - set(algorithm_keys))
    if unknown:
        owners = sorted(name for name, cls in ALGORITHMS.items()
                        if unknown[0] in {f.name for f in dataclasses.fields(cls.config_class)})
        if owners:
            raise ConfigError(f"config: {unknown[0]}: an option of {', '.join(owners)}, not of "
                              f"algo {algo}; allowed for {algo}: " + ", ".join(algorithm_keys))
        raise ConfigError(f"config: unknown key {unknown[0]!r} for algo {algo}; allowed: "
                          + ", ".join([f.name for f in dataclasses.fields(RunSettings)]
                                      + algorithm_keys))
    hyper = build_dataclass(algorithm_class.config_class,
                            {k: v for k, v in raw.items() if k not in run_keys})
    if hyper.horizon is None:
        hyper = dataclasses.replace(hyper, horizon=task.horizon)
    return RunConfig(run=run, algorithm=hyper)


def build(config: RunConfig):
    """Environment, policy and algorithm for a resolved configuration."""
    env = make_env(config.run.env.name, backend=config.run.env.backend,
                   horizon=config.algorithm.horizon)
    policy = GaussianPolicy(env.observation_size, env.action_size,
                            tuple(config.algorithm.hidden_sizes), config.algorithm.activation)
    algorithm = ALGORITHMS[config.run.algo](config.algorithm, env, policy)
    return env, policy, algorithm


class TrainingDiverged(RuntimeError):
    """A loss, return or parameter became non-finite."""


CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT_DIR, TENSORBOARD_DIR, "eval.json")


# Of several non-finite quantities, the error names the first of these that is.
REPORTED_FIRST = ("outer_loss", "pre_return", "post_return", "nonfinite_params")


def flatten_metrics(metrics: dict) -> dict:
    """Device metrics → JSON-ready floats; a [K] array `kl` becomes kl_0 … kl_{K-1}."""
    flat = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            flat[name] = float(value)
        else:
            for index, item in enumerate(value.reshape(-1)):
                flat[f"{name}_{index}"] = float(item)
    return flat


def prepare_output_dir(out_dir: str, force: bool) -> None:
    """Creates `out_dir`; refuses one holding a run unless `force`, which clears it."""
    os.makedirs(out_dir, exist_ok=True)
    existing = [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]
    if existing and not force:
        raise ConfigError(f"config: --out: {out_dir} already holds a run ({existing[0]}); "
                          "choose another directory, --resume it, or pass --force to "
                          "overwrite it")
    for name in existing:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def load_run_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"config: --run/--resume: {run_dir} holds no run (no config.yaml)")
    return resolve_config(load_yaml(path))


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                break
    return records


def _truncate_metrics(run_dir: str, last_iteration: int) -> None:
    """Keeps the records up to `last_iteration`: the iterations after the checkpoint
    are about to be recomputed, identically, and must not appear twice."""
    kept = [r for r in read_metrics(run_dir) if r["iteration"] <= last_iteration]
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def _with_finiteness_check(meta_iteration):
    """Adds the count of non-finite parameter entries to the metrics, in-graph."""

    def checked(state):
        state, metrics = meta_iteration(state)
        leaves = jax.tree.leaves(state.params)
        metrics["nonfinite_params"] = sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)
        return state, metrics

    return checked


def _poison(state):
    """Test-only fault injection: θ full of NaN, so the next iteration diverges."""
    return state.replace(params=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                             state.params))


def train(config: RunConfig, out_dir: str | None = None, force: bool = False,
          resume: bool = False, progress: bool = True,
          on_iteration: Callable[[dict], None] | None = None, return_state: bool = False):
    """Runs meta-iterations up to `config.run.iterations`; returns the metrics of the
    iterations run by this call (and the final training state, with `return_state`).

    Under `jax.distributed` (several processes), every process runs this same loop on
    the global device mesh; only process 0 writes the run's files, while all of them
    take part in checkpointing (orbax coordinates them).

    With `out_dir`: writes `config.yaml` (the resolved configuration), appends one JSON
    line per iteration to `metrics.jsonl`, logs the same scalars to TensorBoard
    (`tensorboard/`), and saves the full training state to `checkpoints/` every
    `checkpoint_every` iterations and at the end. With `resume`, continues the run in
    `out_dir` from its latest checkpoint: the result is the same, iteration for
    iteration, as a run never interrupted.

    Raises TrainingDiverged when a metric or parameter becomes non-finite; the state
    before that iteration is checkpointed first.
    """
    run = config.run
    _, _, algorithm = build(config)
    state = algorithm.init(jax.random.PRNGKey(run.seed))
    first_iteration, env_steps, elapsed_before = 1, 0, 0.0
    checkpointer = None
    primary = jax.process_index() == 0
    if out_dir is not None:
        if not resume and primary:
            prepare_output_dir(out_dir, force)
            with open(os.path.join(out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
        distributed.barrier("run directory prepared")
        checkpointer = Checkpointer(os.path.join(out_dir, CHECKPOINT_DIR),
                                    max_to_keep=run.keep_checkpoints)
        if resume:
            latest = checkpointer.latest_iteration()
            if latest is not None:
                state, host = checkpointer.restore(state, latest)
                first_iteration = latest + 1
                env_steps, elapsed_before = int(host["env_steps"]), float(host["time_s"])
                for name, value in host.get("algorithm", {}).items():
                    setattr(algorithm, name, value)
            if primary:
                _truncate_metrics(out_dir, first_iteration - 1)
    elif resume:
        raise ValueError("resume needs the run directory")
    if first_iteration == 1 and hasattr(algorithm, "prepare"):
        # Host-side set-up before the first iteration (GMPS: experts, demonstrations).
        state = algorithm.prepare(state, run.seed)
    # Counters an algorithm reports beside the meta-training environment steps.
    extra = dict(getattr(algorithm, "host_counters", lambda: {})())

    compile_start = time.perf_counter()
    sharding = distributed.task_sharding(run.devices)
    distributed.check_divisible(config.algorithm.meta_batch_size, sharding)
    replicated = distributed.replicated(sharding)
    state = jax.device_put(state, replicated)
    checked_iteration = _with_finiteness_check(algorithm.meta_iteration)
    if run.debug_nan_at_iteration is not None:
        unplanted = checked_iteration

        def checked_iteration(state):  # the fault is planted in-graph, inside any call
            state = jax.lax.cond(state.iteration + 1 == run.debug_nan_at_iteration,
                                 _poison, lambda s: s, state)
            return unplanted(state)
    programs = {}

    def program(length: int):
        """The compiled call that runs `length` meta-iterations (one program per length:
        `iterations_per_call`, and a shorter one where a call is cut)."""
        if length not in programs:
            def fused(state):
                return jax.lax.scan(lambda carry, _: checked_iteration(carry), state, None,
                                    length=length)

            # Traced under the mesh: the task axis is split over the devices, the state
            # stays replicated (so every call takes the same layout).
            with distributed.use_task_sharding(sharding):
                programs[length] = jax.jit(
                    checked_iteration if length == 1 else fused,
                    in_shardings=replicated, out_shardings=replicated).lower(state).compile()
        return programs[length]

    def call_length(iteration: int) -> int:
        """Iterations in the call starting at `iteration`: `iterations_per_call`, cut at
        the end of the run and at the next checkpoint."""
        return min(run.iterations_per_call, run.iterations - iteration + 1,
                   run.checkpoint_every - (iteration - 1) % run.checkpoint_every)

    # Every call length this run will use is compiled now, so nothing compiles inside
    # the loop (but the one-iteration program a divergence inside a call needs).
    iteration = first_iteration
    while iteration <= run.iterations:
        program(call_length(iteration))
        iteration += call_length(iteration)
    metrics_file = writer = bar = None
    if out_dir is not None and primary:
        metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, TENSORBOARD_DIR),
                               purge_step=first_iteration)
    if progress and primary:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.iterations, initial=first_iteration - 1, unit="it",
                   dynamic_ncols=True)

    def save(iteration, saved_state, steps, elapsed):
        if checkpointer is not None and iteration > 0 and (
                checkpointer.latest_iteration() or 0) < iteration:
            checkpointer.save(iteration, saved_state, {"env_steps": steps, "time_s": elapsed,
                                                       "algorithm": extra})

    history = []
    completed = None  # (iteration, state, env_steps, time_s) of the last finished one
    start = compile_start
    try:
        iteration = first_iteration
        while iteration <= run.iterations:
            length = call_length(iteration)
            tick = time.perf_counter()
            previous_state = state
            state, device_metrics = program(length)(state)
            host_metrics = jax.device_get(device_metrics)
            now = time.perf_counter()
            per_iteration_s = (now - tick) / length
            for offset in range(length):
                metrics = flatten_metrics(host_metrics if length == 1 else jax.tree.map(
                    lambda x, i=offset: x[i], host_metrics))
                bad = sorted((k for k, v in metrics.items()
                              if not math.isfinite(v) or (k == "nonfinite_params" and v > 0)),
                             key=lambda k: (k not in REPORTED_FIRST, k))
                if bad:
                    # The state before the bad iteration: the call's input, run on one
                    # iteration at a time up to it when the bad one is not the first.
                    last_good = iteration + offset - 1
                    good_state = previous_state
                    for _ in range(offset):
                        good_state = program(1)(good_state)[0]
                    save(last_good, good_state, env_steps,
                         elapsed_before + tick + offset * per_iteration_s - start)
                    where = (f"; the last good checkpoint is iteration {last_good} in "
                             f"{checkpointer.directory}" if checkpointer and last_good else "")
                    quantity = ("parameters" if bad[0] == "nonfinite_params" else bad[0])
                    raise TrainingDiverged(
                        f"training diverged at iteration {iteration + offset}: "
                        f"{quantity} non-finite ({metrics[bad[0]]}){where}")
                del metrics["nonfinite_params"]
                env_steps += algorithm.env_steps_per_iteration
                record = {"iteration": iteration + offset, "env_steps": env_steps,
                          "time_s": elapsed_before + tick + (offset + 1) * per_iteration_s
                          - start,
                          "iteration_s": per_iteration_s, "devices": sharding.mesh.size,
                          **extra, **metrics}
                history.append(record)
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    for name, value in record.items():
                        if name != "iteration":
                            writer.add_scalar(name, value, record["iteration"])
            iteration += length
            last = iteration - 1
            completed = (last, state, env_steps, record["time_s"])
            if last % run.checkpoint_every == 0 or last == run.iterations:
                save(last, state, env_steps, record["time_s"])
            if on_iteration:
                for record in history[-length:]:
                    on_iteration(record)
            if bar is not None:
                bar.set_postfix(pre=f"{record['pre_return']:.2f}",
                                post=f"{record['post_return']:.2f}",
                                steps_s=f"{algorithm.env_steps_per_iteration / per_iteration_s:.3g}")
                bar.update(length)
    except KeyboardInterrupt:
        # Keep what was computed: the state after the last completed iteration.
        if completed is not None:
            save(*completed)
        raise
    finally:
        for handle in (bar, metrics_file, writer, checkpointer):
            if handle is not None:
                handle.close()
    return (history, state) if return_state else history
