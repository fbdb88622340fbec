"""A task distribution defined outside the package, as a user would: reach a target on a
line. Named by import path (`tests.custom_task_example:make_task`) in tests/test_custom_tasks.py.

Position x starts at 0, the action moves it by clip(a, -0.2, 0.2), the reward is
-|x' - g| with g ~ U[-1, 1]; episodes never end early.
"""

import jax
import jax.numpy as jnp

from metarl_jax.envs import EnvState, TaskEnv


class LineReach(TaskEnv):
    observation_size = 1
    action_size = 1
    horizon = 10
    can_terminate = False
    task_distribution = "target g ~ U[-1, 1] on a line; reward -|x' - g|"

    def __init__(self, max_step: float = 0.2, horizon: int = 10):
        self.max_step = max_step
        self.horizon = horizon

    def raw_action_bound(self):
        return self.max_step

    def sample_tasks(self, key, num_tasks):
        return {"target": jax.random.uniform(key, (num_tasks,), minval=-1.0, maxval=1.0)}

    def reset(self, key, task):
        position = jnp.zeros(1)
        return EnvState(obs=position, reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=position)

    def step(self, state, action, task):
        position = state.physics + jnp.clip(action, -self.max_step, self.max_step)
        reward = -jnp.abs(position[0] - task["target"])
        return EnvState(obs=position, reward=reward, done=jnp.zeros(()), physics=position)


def make_task(max_step: float = 0.2):
    """A factory: takes no horizon, so the configured one is set on the built task."""
    return LineReach(max_step=max_step)


class SimulatedLineReach(LineReach):
    """The same task declared as physics, as a simulator of one's own would be."""
    physics = True
