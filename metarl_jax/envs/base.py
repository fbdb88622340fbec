"""The task-distribution interface every environment implements.

A task is data: a small pytree (a goal, a direction, a target velocity) sampled with
`jax.random` inside the compiled program and passed explicitly to `reset` and `step`.
Nothing about the task lives in a Python attribute, where it would be baked into the
compiled program as a constant and shared by every vmapped copy.

Environments take the *policy's* action in `step` and convert it to what the simulator
receives themselves (the locomotion tasks divide by 10 and clip to ±1, point-nav clips
to ±0.1), so the rollout code never needs to know which task it is running.
"""

from __future__ import annotations

import abc
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from metarl_jax.config import ConfigError

Task = Any  # a pytree of arrays


@flax.struct.dataclass
class EnvState:
    """What the rollout needs to see after `reset` or `step`.

    Attributes:
      obs: observation after the transition, shape (observation_size,).
      reward: reward of the transition that led here (0 after `reset`).
      done: 1.0 when the episode ended with this transition, else 0.0.
      physics: the simulator's own state (a Brax `State`, a position, ...).
    """

    obs: jax.Array
    reward: jax.Array
    done: jax.Array
    physics: Any


class TaskEnv(abc.ABC):
    """A distribution of tasks sharing dynamics, observation and action spaces.

    Subclasses set `observation_size`, `action_size`, `horizon` (the default episode
    length of the published setting) and `task_distribution` (one line for
    `metarl envs`); `register_task` (metarl_jax.envs.registry) sets `name`. A registered
    task declares them as class attributes.
    """

    name: str
    observation_size: int
    action_size: int
    horizon: int
    task_distribution: str
    backend: str | None = None
    # What a lane does when an episode ends before its H steps are up (metarl_jax.rollout):
    # "reset" starts a fresh episode of the same task, "idle" masks the rest of the lane.
    episode_end: str = "reset"
    # False when `step` never reports done; the rollout then computes no fresh episodes.
    can_terminate: bool = True
    # Other task distributions whose demonstration files serve this one: the same tasks,
    # observations and dynamics under a denser reward (GMPS's experts may see it).
    demonstration_sources: tuple[str, ...] = ()

    @abc.abstractmethod
    def sample_tasks(self, key: jax.Array, num_tasks: int) -> Task:
        """Draws `num_tasks` tasks; every leaf gets a leading axis of that size."""

    @abc.abstractmethod
    def reset(self, key: jax.Array, task: Task) -> EnvState:
        """Starts one episode of `task` (a single task, no leading axis)."""

    @abc.abstractmethod
    def step(self, state: EnvState, action: jax.Array, task: Task) -> EnvState:
        """Applies the policy's raw `action` (scaling and clipping happen here)."""

    def raw_action_bound(self) -> float | None:
        """The bound b of the box [-b, b] (per coordinate, in the policy's raw action
        space) outside which `step` clips the action, so that actions beyond it act as
        the bound itself; None when `step` does not clip."""
        return None

    def task_set(self) -> Task | None:
        """The finite set of tasks the distribution draws from, leading axis the set
        size, or None when the distribution is continuous."""
        return None

    def task_set_size(self) -> int | None:
        """How many tasks `task_set()` holds; None for a continuous distribution."""
        task_set = self.task_set()
        return None if task_set is None else jax.tree.leaves(task_set)[0].shape[0]

    def check_training_task_count(self, num_tasks: int, field: str) -> None:
        """Raises ConfigError, naming the config `field`, when a finite distribution
        holds fewer than `num_tasks` tasks."""
        size = self.task_set_size()
        if size is not None and num_tasks > size:
            raise ConfigError(f"config: {field}: {self.name} has {size} tasks; expected at "
                              f"most {size}")

    def training_tasks(self, key: jax.Array, num_tasks: int) -> Task:
        """A finite meta-training set of `num_tasks` tasks (GMPS, experts).

        A finite distribution contributes its own tasks, evenly thinned when fewer are
        asked for (the 40 ring goals, in order, for 40); a continuous one `num_tasks`
        draws.
        """
        size = self.task_set_size()
        if size is None:
            return self.sample_tasks(key, num_tasks)
        self.check_training_task_count(num_tasks, "num_tasks")
        index = jnp.round(jnp.linspace(0, size - 1, num_tasks)).astype(jnp.int32)
        return jax.tree.map(lambda leaf: leaf[index], self.task_set())

    def describe(self) -> dict:
        return describe(self)


def describe(env: TaskEnv | type[TaskEnv]) -> dict:
    """The `metarl envs` row of a task distribution, built or not: a registered class
    declares every field, so the row of the class and of a built env agree."""
    return {
        "name": env.name,
        "observation_size": env.observation_size,
        "action_size": env.action_size,
        "horizon": env.horizon,
        "body": getattr(env, "brax_name", "pure JAX"),
        # a built env: the backend it runs on; a class: the one it runs on by default
        "backend": getattr(env, "backend", None) or getattr(env, "default_backend", "-"),
        "tasks": getattr(env, "task_distribution", ""),
    }


def scale_locomotion_action(action: jax.Array, action_scale: float = 10.0) -> jax.Array:
    """Maps a policy action from the ±`action_scale` box to the simulator's ±1 box.

    The ProMP / rllab convention: the Gaussian policy samples in a box of ±10 and the
    environment receives `clip(a / 10, -1, 1)`. With it, the reference inner step
    α = 0.1 and initial std 1 behave as in the papers; without it they do not.
    """
    return jnp.clip(action / action_scale, -1.0, 1.0)
