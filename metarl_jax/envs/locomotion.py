"""Brax locomotion task distributions of the ProMP and MAML papers.

Each task wraps one stock Brax environment and replaces its reward with the task's own,
computed from the quantities Brax reports in `state.metrics` and from the environment
action (after the ±10 → ±1 scaling), so the reward formulas read exactly as in
ENVIRONMENTS.md. Termination (ant) comes from Brax's own `done`; the rollout masks the
steps after it.
"""

from __future__ import annotations

import contextlib
import functools
import io

import jax
import jax.numpy as jnp

from metarl_jax.envs.base import EnvState, TaskEnv, scale_locomotion_action

BRAX_BACKENDS = ("generalized", "positional", "spring", "mjx")


@functools.lru_cache(maxsize=None)
def _brax_env(brax_name: str, backend: str):
    # Loading and parsing the MJCF model takes a second; every task of the same body
    # and backend can share one Brax environment since it holds no task information.
    # MuJoCo's optional warp backend prints to stdout when warp is absent: keep our
    # command-line output clean of it.
    with contextlib.redirect_stdout(io.StringIO()):
        from brax import envs as brax_envs

        return brax_envs.get_environment(brax_name, backend=backend)


class BraxTaskEnv(TaskEnv):
    """A Brax body plus a task-conditioned reward."""

    brax_name: str
    action_scale = 10.0

    def __init__(self, backend: str = "generalized", horizon: int | None = None):
        if backend not in BRAX_BACKENDS:
            raise ValueError(f"env.backend: unknown Brax backend {backend!r}; "
                             f"allowed: {', '.join(BRAX_BACKENDS)}")
        self.backend = backend
        self.brax_env = _brax_env(self.brax_name, backend)
        self.observation_size = int(self.brax_env.observation_size)
        self.action_size = int(self.brax_env.action_size)
        if horizon is not None:
            self.horizon = horizon

    def reset(self, key, task):
        brax_state = self.brax_env.reset(key)
        return EnvState(obs=brax_state.obs, reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=brax_state)

    def step(self, state, action, task):
        env_action = scale_locomotion_action(action, self.action_scale)
        brax_state = self.brax_env.step(state.physics, env_action)
        reward = self.task_reward(brax_state.metrics, env_action, task)
        return EnvState(obs=brax_state.obs, reward=reward, done=brax_state.done,
                        physics=brax_state)

    def task_reward(self, metrics: dict, env_action: jax.Array, task) -> jax.Array:
        raise NotImplementedError


def _random_sign(key, num_tasks):
    return jnp.where(jax.random.bernoulli(key, 0.5, (num_tasks,)), 1.0, -1.0)


class HalfCheetahDirection(BraxTaskEnv):
    name = "halfcheetah-dir"
    brax_name = "halfcheetah"
    horizon = 100
    task_distribution = "direction d in {-1, +1}; reward d*v_x - 0.05||a||^2"
    ctrl_cost_weight = 0.05

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_sign(key, num_tasks)}

    def task_reward(self, metrics, env_action, task):
        return (task["direction"] * metrics["x_velocity"]
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


class HalfCheetahVelocity(BraxTaskEnv):
    name = "halfcheetah-vel"
    brax_name = "halfcheetah"
    horizon = 100
    task_distribution = "target velocity v* ~ U[0, 2]; reward -|v_x - v*| - 0.05||a||^2"
    ctrl_cost_weight = 0.05

    def sample_tasks(self, key, num_tasks):
        return {"velocity": jax.random.uniform(key, (num_tasks,), minval=0.0, maxval=2.0)}

    def task_reward(self, metrics, env_action, task):
        return (-jnp.abs(metrics["x_velocity"] - task["velocity"])
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


class AntDirection(BraxTaskEnv):
    """Ant running forward or backward along x.

    Brax's ant exposes no contact forces (its `use_contact_forces` is unimplemented), so
    the contact cost of the MuJoCo task is zero here, as in every Brax ant.
    """

    name = "ant-dir"
    brax_name = "ant"
    horizon = 100
    task_distribution = ("direction d in {-1, +1}; reward d*v_x - 0.5||a||^2 - contact + 1; "
                         "terminates when unhealthy")
    ctrl_cost_weight = 0.5
    survive_reward = 1.0

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_sign(key, num_tasks)}

    def task_reward(self, metrics, env_action, task):
        contact_cost = -metrics["reward_contact"]
        return (task["direction"] * metrics["x_velocity"]
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2)
                - contact_cost + self.survive_reward)
