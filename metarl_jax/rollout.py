"""Sampling episodes: `lax.scan` over the horizon, vmapped over episodes and over tasks.

Episodes have a fixed horizon H. An episode that ends early is *masked*, not reset: the
simulator state is frozen at its last real step and `masks` is 0 from the next step on,
so returns, baselines and losses only ever see real transitions.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from metarl_jax.envs.base import TaskEnv
from metarl_jax.policies import GaussianPolicy


@flax.struct.dataclass
class Trajectories:
    """A batch of episodes. Leading axes are free ([M, N, H] after `collect`).

    `log_probs`, `means` and `log_stds` describe the policy that *sampled* the actions:
    they are the constants `logp_old` and π_old of the likelihood-ratio and KL terms.
    `returns` (discounted reward-to-go) and `advantages` are filled in by
    `metarl_jax.advantages.process_phase`.
    """

    observations: jax.Array  # [..., H, obs]
    actions: jax.Array  # [..., H, act], the policy's raw action (before env scaling)
    rewards: jax.Array  # [..., H], 0 on masked steps
    masks: jax.Array  # [..., H], 1.0 on real steps
    log_probs: jax.Array  # [..., H]
    means: jax.Array  # [..., H, act]
    log_stds: jax.Array  # [..., H, act]
    returns: jax.Array  # [..., H]
    advantages: jax.Array  # [..., H]

    def episode_returns(self) -> jax.Array:
        """Undiscounted return of each episode, shape [...]."""
        return jnp.sum(self.rewards * self.masks, axis=-1)


def rollout_episode(env: TaskEnv, policy: GaussianPolicy, params, task, key: jax.Array,
                    horizon: int) -> Trajectories:
    """One episode of `task` under `params`; every field has a leading axis H."""
    reset_key, action_key = jax.random.split(key)
    first_state = env.reset(reset_key, task)

    def step(carry, step_key):
        state, alive = carry
        action, log_prob, mean, log_std = policy.sample(params, state.obs, step_key)
        stepped = env.step(state, action, task)
        transition = dict(observations=state.obs, actions=action,
                          rewards=jnp.where(alive > 0, stepped.reward, 0.0), masks=alive,
                          log_probs=log_prob, means=mean, log_stds=log_std)
        # After the episode ends, keep the last real state: stepping a fallen body on
        # could produce non-finite values that would leak through 0 * NaN.
        next_state = jax.tree.map(lambda new, old: jnp.where(alive > 0, new, old),
                                  stepped, state)
        next_alive = alive * (1.0 - stepped.done)
        return (next_state, next_alive), transition

    _, steps = jax.lax.scan(step, (first_state, jnp.ones(())),
                            jax.random.split(action_key, horizon))
    zeros = jnp.zeros_like(steps["rewards"])
    return Trajectories(**steps, returns=zeros, advantages=zeros)


def collect(env: TaskEnv, policy: GaussianPolicy, params, tasks, key: jax.Array,
            episodes_per_task: int, horizon: int, per_task_params: bool = True
            ) -> Trajectories:
    """Samples `episodes_per_task` episodes for each task: fields are [M, N, H, ...].

    Args:
      params: policy parameters, with a leading task axis M when `per_task_params`
        (adapted policies), else one set shared by all tasks (the meta-policy θ).
      tasks: a task pytree with leading axis M.
    """
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]

    def task_episodes(task_params, task, task_key):
        episode_keys = jax.random.split(task_key, episodes_per_task)
        return jax.vmap(rollout_episode, in_axes=(None, None, None, None, 0, None))(
            env, policy, task_params, task, episode_keys, horizon)

    params_axis = 0 if per_task_params else None
    return jax.vmap(task_episodes, in_axes=(params_axis, 0, 0))(
        params, tasks, jax.random.split(key, num_tasks))
