"""2D point navigation (MAML, MEMRL, pytorch-maml-rl): reach a goal in the unit square.

The agent starts at the origin; its observation is its position; the action moves it by
`clip(a, -0.1, 0.1)` per coordinate; the reward is minus the Euclidean distance from the
*new* position to the goal. The episode ends when both coordinates are within 0.01 of the
goal. Goals are drawn uniformly from [-0.5, 0.5]². As in pytorch-maml-rl's batch
episodes, a lane whose episode reached the goal stays idle (masked) to the horizon.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metarl_jax.envs.base import EnvState, TaskEnv
from metarl_jax.envs.registry import register_task


@register_task("point-nav")
class PointNav(TaskEnv):
    observation_size = 2
    action_size = 2
    horizon = 100
    episode_end = "idle"
    task_distribution = "goal ~ U[-0.5, 0.5]^2; reward -||s' - g||; start (0, 0)"

    def __init__(self, goal_low: float = -0.5, goal_high: float = 0.5, max_step: float = 0.1,
                 success_radius: float = 0.01, horizon: int = 100):
        self.goal_low = goal_low
        self.goal_high = goal_high
        self.max_step = max_step
        self.success_radius = success_radius
        self.horizon = horizon

    def raw_action_bound(self):
        return self.max_step

    def sample_tasks(self, key, num_tasks):
        goals = jax.random.uniform(key, (num_tasks, 2), minval=self.goal_low,
                                   maxval=self.goal_high)
        return {"goal": goals}

    def reset(self, key, task):
        del key  # the start is deterministic, as in the reference tasks
        position = jnp.zeros(2)
        return EnvState(obs=position, reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=position)

    def step(self, state, action, task):
        position = state.physics + jnp.clip(action, -self.max_step, self.max_step)
        offset = position - task["goal"]
        reward = -jnp.sqrt(jnp.sum(offset ** 2))
        done = jnp.all(jnp.abs(offset) < self.success_radius).astype(jnp.float32)
        return EnvState(obs=position, reward=reward, done=done, physics=position)
