"""GMPS phase 1: per-task PPO experts and their demonstrations.

`ExpertConfig` holds the experts' options (`metarl experts --set`, and the ones GMPS's
experts mode fills in from `gmps.*`). `train_and_collect` trains one expert per task
(`metarl_jax.ppo`) and records their demonstrations (`metarl_jax.demonstrations`); both
the `metarl experts` command (`run_experts`, which writes the file) and GMPS's
`prepare` (which trains on them directly) call it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from metarl_jax.config import (ConfigError, EnvConfig, at_least, build_dataclass, check, field,
                               one_of, positive, unit_interval)
from metarl_jax.demonstrations import (Demonstrations, collect_demonstrations,
                                       save_demonstrations)
from metarl_jax.envs import lookup, make_env
from metarl_jax.envs.base import TaskEnv
from metarl_jax.policies import ACTIVATIONS
from metarl_jax.ppo import expert_policy, resolve_horizon, train_experts, validate_expert_config


def _widths() -> dict:
    return check(lambda v: len(v) >= 1 and all(w >= 1 for w in v),
                 "a non-empty list of widths >= 1")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """PPO experts, one per task. Validated by `config.build_dataclass` (the CLI's --set).

    `num_tasks` and `seed` are used by the CLI to sample the training tasks;
    `train_experts` trains one expert per task it is given.
    """

    num_tasks: int = field(40, **at_least(1))
    iterations: int = field(200, **at_least(1))  # PPO iterations (sample + update)
    episodes_per_iteration: int = field(10, **at_least(1))  # per task
    horizon: int | None = field(None, **at_least(1))  # None: the environment's default
    hidden_sizes: tuple[int, ...] = field((64, 64), **_widths())
    activation: str = field("tanh", **one_of(*ACTIVATIONS))
    learning_rate: float = field(3e-4, **positive())
    clip_eps: float = field(0.2, **positive())
    epochs: int = field(10, **at_least(1))
    minibatches: int = field(4, **at_least(1))
    discount: float = field(0.99, **unit_interval())
    gae_lambda: float = field(0.95, **unit_interval())
    entropy_coeff: float = field(0.0, **at_least(0.0))
    # "value": a learned value MLP V(s, t/H) with per-task target normalisation;
    # "linear": the library's linear feature baseline, refitted on every batch.
    baseline: str = field("value", **one_of("value", "linear"))
    value_hidden_sizes: tuple[int, ...] = field((64, 64), **_widths())
    value_coeff: float = field(0.5, **at_least(0.0))
    max_grad_norm: float = field(0.5, **at_least(0.0))  # 0: no clipping
    demos_per_task: int = field(10, **at_least(1))  # demonstration episodes per task
    deterministic_demos: bool = False  # experts act with their mean in demonstrations
    seed: int = 0


def train_and_collect(env: TaskEnv, tasks, config: ExpertConfig, train_key: jax.Array,
                      demo_key: jax.Array, callback: Callable[[int, dict], None] | None = None
                      ) -> tuple[Demonstrations, dict]:
    """Trains one PPO expert per task of `tasks` (`ppo.train_experts`, with `train_key`
    and `callback`), then rolls each out for `config.demos_per_task` episodes on its own
    task (`collect_demonstrations`, with `demo_key`).

    Returns:
      (demonstrations, info): the demonstrations on the host, the experts' parameters
      included and `expert_env_steps` counting training and demonstration rollouts; and
      `train_experts`' info with `demo_returns` [T] added (each task's mean episode
      return in the demonstrations).
    """
    params, info = train_experts(env, tasks, config, train_key, callback=callback)
    batch = collect_demonstrations(env, expert_policy(env, config), params, tasks, demo_key,
                                   config.demos_per_task, resolve_horizon(env, config),
                                   config.deterministic_demos)
    demos = Demonstrations(
        env_name=env.name, observations=batch.observations, actions=batch.actions,
        counts=batch.counts, tasks=jax.device_get(tasks), expert_params=jax.device_get(params),
        hidden_sizes=tuple(config.hidden_sizes), activation=config.activation,
        expert_env_steps=int(info["env_steps"]) + int(batch.env_steps))
    return demos, {**info, "demo_returns": batch.returns}


# --- the `metarl experts` command ---------------------------------------------------------


def resolve_expert_config(env_name: str, raw: dict) -> tuple[TaskEnv, ExpertConfig]:
    """Validates `metarl experts` options and builds the environment; compiles nothing.

    `raw` holds ExpertConfig keys and optionally an `env` section (`env.backend`); the
    environment's name is `env_name`. Raises ConfigError naming the field.
    """
    raw = dict(raw)
    section = raw.pop("env", {})
    if not isinstance(section, dict):
        raise ConfigError(f"config: env: expected a mapping, got {section!r}")
    env_config = build_dataclass(EnvConfig, {**section, "name": env_name}, "env.")
    lookup(env_config.name)  # a registered task or module:attribute; ConfigError if neither
    config = build_dataclass(ExpertConfig, raw)
    try:
        env = make_env(env_config.name, backend=env_config.backend, horizon=config.horizon)
    except ValueError as error:
        raise ConfigError(f"config: {error}") from None
    validate_expert_config(env, config)
    env.check_training_task_count(config.num_tasks, "num_tasks")
    return env, config


def run_experts(env: TaskEnv, config: ExpertConfig, out_path,
                log: Callable[[str], None] | None = None) -> dict:
    """Samples `config.num_tasks` tasks with `config.seed`, trains their experts, collects
    `config.demos_per_task` demonstration episodes each and writes `out_path` (experts'
    parameters included). Returns a summary dict.

    Keys: PRNGKey(seed) is split into (tasks, training, demonstrations).
    """
    task_key, train_key, demo_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    tasks = env.training_tasks(task_key, config.num_tasks)
    every = max(1, config.iterations // 10)

    def progress(iteration, metrics):
        if iteration == 1 or iteration % every == 0 or iteration == config.iterations:
            log(f"iteration {iteration}/{config.iterations}: return {metrics['return']:.3f}, "
                f"std {metrics['std']:.3f}, clip_fraction {metrics['clip_fraction']:.3f}")

    demos, info = train_and_collect(env, tasks, config, train_key, demo_key,
                                    callback=progress if log is not None else None)
    path = save_demonstrations(out_path, demos.env_name, demos.tasks, demos.observations,
                               demos.actions, demos.counts, expert_params=demos.expert_params,
                               hidden_sizes=demos.hidden_sizes,
                               expert_env_steps=demos.expert_env_steps,
                               activation=demos.activation,
                               backend=getattr(env, "backend", None))
    return {"path": path, "num_tasks": config.num_tasks,
            "initial_return": float(info["returns"][0]),
            "final_return": float(np.mean(info["demo_returns"])),
            "task_returns": info["demo_returns"].tolist(),
            "training_env_steps": int(info["env_steps"]), "env_steps": demos.expert_env_steps,
            "steps_per_task": int(demos.observations.shape[1]),
            "real_steps": int(demos.counts.sum())}
