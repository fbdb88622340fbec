"""The host loop: resolve and validate the configuration, compile the meta-iteration
once, run it, and write metrics. Python only logs between compiled calls.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import yaml

from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.config import ConfigError, EnvConfig, at_least, build_dataclass, field, to_dict
from metarl_jax.envs import ENVIRONMENTS, TaskEnv, env_names, make_env
from metarl_jax.policies import GaussianPolicy

# The experiment `metarl train` runs when given no configuration, the same as
# experiments/promp_point_nav.yaml (a test keeps the two equal).
DEFAULT_EXPERIMENT: dict[str, Any] = {
    "algo": "promp",
    "seed": 0,
    "iterations": 100,
    "env": {"name": "point-nav"},
    "meta_batch_size": 20,
    "episodes_per_task": 20,
    "horizon": 100,
}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The keys of a run that are not the algorithm's hyperparameters."""

    algo: str = "promp"
    seed: int = 0
    iterations: int = field(1001, **at_least(1))
    env: EnvConfig = EnvConfig()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run: RunSettings
    algorithm: Any  # the algorithm's own config dataclass

    def to_dict(self) -> dict:
        """Flat form, as in the YAML files."""
        return {**to_dict(self.run), **to_dict(self.algorithm)}


def resolve_config(raw: dict) -> RunConfig:
    """Validates a flat configuration dict and fills every default.

    Raises ConfigError (one line naming the field and the allowed values) on an unknown
    algorithm, environment or key, or a value of the wrong type or range. Nothing is
    built or compiled here.
    """
    raw = dict(raw)
    algo = raw.get("algo", RunSettings.algo)
    if algo not in ALGORITHMS:
        raise ConfigError(f"config: algo: unknown algorithm {algo!r}; allowed: "
                          + ", ".join(sorted(ALGORITHMS)))
    run_keys = {f.name for f in dataclasses.fields(RunSettings)}
    run = build_dataclass(RunSettings, {k: v for k, v in raw.items() if k in run_keys})
    if run.env.name not in ENVIRONMENTS:
        raise ConfigError(f"config: env.name: unknown environment {run.env.name!r}; "
                          f"allowed: {', '.join(env_names())}")
    algorithm_class = ALGORITHMS[algo]
    algorithm_keys = [f.name for f in dataclasses.fields(algorithm_class.config_class)]
    unknown = sorted(set(raw) - run_keys - set(algorithm_keys))
    if unknown:
        raise ConfigError(f"config: unknown key {unknown[0]!r} for algo {algo}; allowed: "
                          + ", ".join([f.name for f in dataclasses.fields(RunSettings)]
                                      + algorithm_keys))
    hyper = build_dataclass(algorithm_class.config_class,
                            {k: v for k, v in raw.items() if k not in run_keys})
    if hyper.horizon is None:
        hyper = dataclasses.replace(hyper, horizon=ENVIRONMENTS[run.env.name].horizon)
    return RunConfig(run=run, algorithm=hyper)


def build(config: RunConfig):
    """Environment, policy and algorithm for a resolved configuration."""
    env = make_env(config.run.env.name, backend=config.run.env.backend,
                   horizon=config.algorithm.horizon)
    policy = GaussianPolicy(env.observation_size, env.action_size,
                            tuple(config.algorithm.hidden_sizes))
    algorithm = ALGORITHMS[config.run.algo](config.algorithm, env, policy)
    return env, policy, algorithm


class TrainingDiverged(RuntimeError):
    """A loss, return or parameter became non-finite."""


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
    os.makedirs(out_dir, exist_ok=True)
    existing = [n for n in ("config.yaml", "metrics.jsonl") if os.path.exists(
        os.path.join(out_dir, n))]
    if existing and not force:
        raise ConfigError(f"config: --out: {out_dir} already holds a run ({existing[0]}); "
                          "choose another directory or pass --force to overwrite it")
    for name in existing:
        os.remove(os.path.join(out_dir, name))


def train(config: RunConfig, out_dir: str | None = None, force: bool = False,
          progress: bool = True, on_iteration: Callable[[dict], None] | None = None
          ) -> list[dict]:
    """Runs `config.run.iterations` meta-iterations; returns the per-iteration metrics.

    With `out_dir`, writes `config.yaml` (the resolved configuration) first and appends
    one JSON line per iteration to `metrics.jsonl`.
    """
    if out_dir is not None:
        prepare_output_dir(out_dir, force)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)

    _, _, algorithm = build(config)
    state = algorithm.init(jax.random.PRNGKey(config.run.seed))
    meta_iteration = jax.jit(algorithm.meta_iteration)

    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if out_dir else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.run.iterations, unit="it", dynamic_ncols=True)
    history = []
    env_steps = 0
    start = time.perf_counter()
    try:
        for iteration in range(1, config.run.iterations + 1):
            tick = time.perf_counter()
            state, device_metrics = meta_iteration(state)
            metrics = flatten_metrics(jax.device_get(device_metrics))
            now = time.perf_counter()
            env_steps += algorithm.env_steps_per_iteration
            record = {"iteration": iteration, "env_steps": env_steps,
                      "time_s": now - start, "iteration_s": now - tick, **metrics}
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                raise TrainingDiverged(f"training diverged at iteration {iteration}: "
                                       f"{bad[0]} is {metrics[bad[0]]}")
            history.append(record)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if on_iteration:
                on_iteration(record)
            if bar is not None:
                bar.set_postfix(pre=f"{record['pre_return']:.2f}",
                                post=f"{record['post_return']:.2f}",
                                steps_s=f"{algorithm.env_steps_per_iteration / (now - tick):.3g}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file:
            metrics_file.close()
    return history


def describe_envs() -> list[dict]:
    """One row per registered environment (builds each, which loads Brax models)."""
    rows = []
    for name in env_names():
        env: TaskEnv = make_env(name)
        rows.append(env.describe())
    return rows
