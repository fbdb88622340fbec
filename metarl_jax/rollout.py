"""Sampling: `lax.scan` over H steps, vmapped over a task's N lanes and over tasks.

A phase spends a fixed budget of M·N·H transitions: per task, N lanes of H steps. What a
lane does when an episode ends before its H steps are up is the task's rule
(`TaskEnv.episode_end`):

- "reset" (the locomotion tasks, as the reference samplers do): a fresh episode of the
  same task starts at the next step, so every one of the H steps is a real transition.
  The episode still running when the lane's steps run out is cut there: a time-limit
  truncation, whose tail is valued 0 like every episode end (the reference's GAE).
- "idle" (2D navigation, as pytorch-maml-rl's batch episodes): the lane stays at its
  last state and `masks` is 0 from the next step on.

`dones` marks the step an episode ended with and `timesteps` counts steps within the
episode, so returns, GAE, the baseline's time feature and DiCE's cumulative
log-likelihood all restart at episode boundaries (`metarl_jax.advantages`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from metarl_jax.distributed import shard_tasks
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
    dones: jax.Array  # [..., H], 1.0 where an episode ended with this step's transition
    timesteps: jax.Array  # [..., H], the step's index within its episode (float)
    log_probs: jax.Array  # [..., H]
    means: jax.Array  # [..., H, act]
    log_stds: jax.Array  # [..., H, act]
    returns: jax.Array  # [..., H]
    advantages: jax.Array  # [..., H]

    def lane_episode_totals(self) -> tuple[jax.Array, jax.Array]:
        """Per lane, shape [...]: (summed undiscounted return of the counted episodes,
        how many were counted).

        The counted episodes of a lane are those that ended inside it; a lane in which
        none ended (a body that never fell, a goal never reached) counts its one cut
        episode instead, so every lane contributes at least one episode.
        """
        horizon = self.rewards.shape[-1]
        steps = jnp.arange(horizon)
        ended = jnp.sum(self.dones, axis=-1)
        last_end = jnp.max(jnp.where(self.dones > 0, steps, -1), axis=-1)
        real_rewards = self.rewards * self.masks
        ended_total = jnp.sum(jnp.where(steps <= last_end[..., None], real_rewards, 0.0),
                              axis=-1)
        has_ended = ended > 0
        return (jnp.where(has_ended, ended_total, jnp.sum(real_rewards, axis=-1)),
                jnp.where(has_ended, ended, 1.0))

    def episode_count(self, axis=None) -> jax.Array:
        """How many episodes `mean_episode_return` averages over (summed over `axis`
        of the lane axes, all of them by default)."""
        return jnp.sum(self.lane_episode_totals()[1], axis=axis)

    def mean_episode_return(self, axis=None) -> jax.Array:
        """Mean undiscounted return of the counted episodes (`lane_episode_totals`),
        pooled over `axis` of the lane axes [...] (all of them by default)."""
        totals, counts = self.lane_episode_totals()
        return jnp.sum(totals, axis=axis) / jnp.sum(counts, axis=axis)


def rollout_lane(env: TaskEnv, policy: GaussianPolicy, params, task, key: jax.Array,
                 horizon: int) -> Trajectories:
    """One lane of `horizon` steps on `task` under `params`; every field has a leading
    axis H. Episodes that end inside the lane follow `env.episode_end` (module doc)."""
    reset_key, action_key = jax.random.split(key)
    first_state = env.reset(reset_key, task)
    restarts = env.episode_end == "reset" and env.can_terminate
    # A stream of its own for the fresh episodes, so the action noise of a lane whose
    # episode never ends does not depend on whether the task can terminate.
    restart_keys = jax.random.split(jax.random.fold_in(reset_key, 1), horizon)

    def step(carry, keys):
        state, alive, timestep = carry
        step_key, restart_key = keys
        action, log_prob, mean, log_std = policy.sample(params, state.obs, step_key)
        stepped = env.step(state, action, task)
        done = stepped.done * alive
        transition = dict(observations=state.obs, actions=action,
                          rewards=jnp.where(alive > 0, stepped.reward, 0.0), masks=alive,
                          dones=done, timesteps=timestep, log_probs=log_prob, means=mean,
                          log_stds=log_std)
        if restarts:
            # The ended body is never stepped again: its successor is a fresh episode.
            fresh = env.reset(restart_key, task)
            next_state = jax.tree.map(lambda new, start: jnp.where(done > 0, start, new),
                                      stepped, fresh)
            return (next_state, alive, jnp.where(done > 0, 0.0, timestep + 1.0)), transition
        # Idle after the end: keep the last real state (stepping a fallen body on could
        # produce non-finite values that would leak through 0 * NaN).
        next_state = jax.tree.map(lambda new, old: jnp.where(alive > 0, new, old),
                                  stepped, state)
        return (next_state, alive * (1.0 - stepped.done), timestep + 1.0), transition

    _, steps = jax.lax.scan(step, (first_state, jnp.ones(()), jnp.zeros(())),
                            (jax.random.split(action_key, horizon), restart_keys))
    zeros = jnp.zeros_like(steps["rewards"])
    return Trajectories(**steps, returns=zeros, advantages=zeros)


def collect(env: TaskEnv, policy: GaussianPolicy, params, tasks, key: jax.Array,
            episodes_per_task: int, horizon: int, per_task_params: bool = True
            ) -> Trajectories:
    """Samples `episodes_per_task` lanes of `horizon` steps for each task: fields are
    [M, N, H, ...], M·N·H real transitions where tasks reset on termination.

    Args:
      params: policy parameters, with a leading task axis M when `per_task_params`
        (adapted policies), else one set shared by all tasks (the meta-policy θ).
      tasks: a task pytree with leading axis M.

    Under an active task sharding (`metarl_jax.distributed.use_task_sharding`) the task
    axis is placed over the devices here, so every algorithm's rollouts are split alike.
    """
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    tasks = shard_tasks(tasks)
    if per_task_params:
        params = shard_tasks(params)

    def task_episodes(task_params, task, task_key):
        episode_keys = jax.random.split(task_key, episodes_per_task)
        return jax.vmap(rollout_lane, in_axes=(None, None, None, None, 0, None))(
            env, policy, task_params, task, episode_keys, horizon)

    params_axis = 0 if per_task_params else None
    return jax.vmap(task_episodes, in_axes=(params_axis, 0, 0))(
        params, tasks, jax.random.split(key, num_tasks))
