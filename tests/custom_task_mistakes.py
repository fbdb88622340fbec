"""Task definitions that break the TaskEnv contract, one mistake each, for the one-line
errors checked in tests/test_custom_tasks.py."""

import jax
import jax.numpy as jnp
import numpy as np

from metarl_jax.envs import EnvState, TaskEnv

not_a_task = 3


class NotATask:
    def sample_tasks(self, key, num_tasks):
        return {}


class Base(TaskEnv):
    """A correct two-dimensional task; each mistake below overrides one part."""

    observation_size = 2
    action_size = 2
    horizon = 5

    def sample_tasks(self, key, num_tasks):
        return {"goal": jax.random.uniform(key, (num_tasks, 2))}

    def reset(self, key, task):
        return EnvState(obs=jnp.zeros(2), reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=jnp.zeros(2))

    def step(self, state, action, task):
        position = state.physics + action
        return EnvState(obs=position, reward=-jnp.sum((position - task["goal"]) ** 2),
                        done=jnp.zeros(()), physics=position)


class MissingStep(TaskEnv):
    observation_size = 2
    action_size = 2
    horizon = 5

    def sample_tasks(self, key, num_tasks):
        return {"goal": jnp.zeros((num_tasks, 2))}

    def reset(self, key, task):
        return Base.reset(self, key, task)


def returns_something_else():
    return object()


def raises():
    raise RuntimeError("no goal file")


class NoSizes(Base):
    observation_size = None


class BadEpisodeEnd(Base):
    episode_end = "stop"


class NumpySampler(Base):
    def sample_tasks(self, key, num_tasks):
        return {"goal": np.asarray(jax.random.uniform(key, (num_tasks, 2)))}


class StringLeaf(Base):
    def sample_tasks(self, key, num_tasks):
        return {"goal": jax.random.uniform(key, (num_tasks, 2)), "label": "left"}


class IgnoresNumTasks(Base):
    def sample_tasks(self, key, num_tasks):
        return {"goal": jax.random.uniform(key, (2,))}


class WrongResetObs(Base):
    def reset(self, key, task):
        return EnvState(obs=jnp.zeros(3), reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=jnp.zeros(2))


class WrongStepObs(Base):
    def step(self, state, action, task):
        stepped = super().step(state, action, task)
        return stepped.replace(obs=jnp.concatenate([stepped.obs, task["goal"]]))


class VectorReward(Base):
    def step(self, state, action, task):
        stepped = super().step(state, action, task)
        return stepped.replace(reward=-(stepped.obs - task["goal"]) ** 2)


class BoolDone(Base):
    def step(self, state, action, task):
        return super().step(state, action, task).replace(done=jnp.array(False))


class NotAState(Base):
    def reset(self, key, task):
        return jnp.zeros(2)
