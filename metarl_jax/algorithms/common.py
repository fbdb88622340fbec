"""Sampling machinery shared by the on-policy meta-learners (ProMP, the MAML family)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metarl_jax.advantages import process_phase
from metarl_jax.algorithms.base import AdaptationReturns
from metarl_jax.config import SamplingConfig
from metarl_jax.distributed import shard_tasks
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import inner_update, lvc_inner_loss
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import Trajectories, collect


def broadcast_to_tasks(params, num_tasks: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks,) + x.shape), params)


def standard_advantages(batch: Trajectories, config: SamplingConfig) -> Trajectories:
    """Per-task linear baseline, GAE(γ, λ), per-task normalisation."""
    return process_phase(batch, config.discount, config.gae_lambda,
                         config.normalize_advantages)


def sample_adaptation_phases(env: TaskEnv, policy: GaussianPolicy, config: SamplingConfig,
                             theta, tasks, key: jax.Array, inner_loss=lvc_inner_loss,
                             process=standard_advantages, return_adapted: bool = False,
                             inner_lr=None):
    """Inner adaptation with fresh episodes at every step, shared by the MAML family.

    For k = 0..K-1: sample a batch with φ_k (φ_0 = θ), fill its advantages with
    `process(batch, config)`, and set φ_{k+1} = φ_k − α ∇ L_in(φ_k). Then sample the
    post-update batch with φ_K. `inner_lr` overrides `config.inner_lr` (a scalar, or a
    pytree of per-parameter step sizes).

    Returns:
      (pre_batches with leading axes [M, K] (task-major, as the per-task outer losses
      consume them), post_batch [M]), and φ_K [M] as a third element when
      `return_adapted`.
    """
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    step_size = config.inner_lr if inner_lr is None else inner_lr

    def phase(params, inputs):
        phase_key, is_inner_phase = inputs
        batch = collect(env, policy, params, tasks, phase_key, config.episodes_per_task,
                        config.horizon)
        batch = process(batch, config)

        def adapt(params):
            return jax.vmap(inner_update, in_axes=(None, None, 0, 0, None))(
                inner_loss, policy, params, batch, step_size)

        return jax.lax.cond(is_inner_phase, adapt, lambda p: p, params), batch

    # One scan over all K + 1 phases, so the rollout is traced and compiled once (for
    # Brax bodies that halves compile time); the post-update phase skips the step.
    phase_keys = jax.random.split(key, config.inner_steps + 1)
    is_inner_phase = jnp.arange(config.inner_steps + 1) < config.inner_steps
    # The carry is placed over the devices from the start, as `collect` places it.
    adapted, batches = jax.lax.scan(phase, shard_tasks(broadcast_to_tasks(theta, num_tasks)),
                                    (phase_keys, is_inner_phase))
    pre_batches = jax.tree.map(lambda x: jnp.swapaxes(x[:-1], 0, 1), batches)
    post_batch = jax.tree.map(lambda x: x[-1], batches)
    if return_adapted:
        return pre_batches, post_batch, adapted
    return pre_batches, post_batch


def phase_returns(pre_batches: Trajectories, post_batch: Trajectories) -> dict:
    """Mean undiscounted episode return of every phase, pre (θ), after each step and
    post, over the episodes each phase counts (`Trajectories.mean_episode_return`), and
    how many episodes that was for θ's phase and the post-update one."""
    phase_means = pre_batches.mean_episode_return(axis=(0, 2))  # [K]
    metrics = {"pre_return": phase_means[0],
               "post_return": post_batch.mean_episode_return(),
               "pre_episodes": pre_batches.episode_count(axis=(0, 2))[0],
               "post_episodes": post_batch.episode_count()}
    for k in range(1, phase_means.shape[0]):
        metrics[f"return_after_step_{k}"] = phase_means[k]
    return metrics


def adaptation_returns(env: TaskEnv, policy: GaussianPolicy, config: SamplingConfig, params,
                       key: jax.Array, num_tasks: int, adapt_steps: int,
                       episodes_per_task: int, inner_loss=lvc_inner_loss,
                       process=standard_advantages, inner_lr=None) -> AdaptationReturns:
    """Adaptation on freshly sampled tasks: `adapt_steps` inner steps from θ with fresh
    episodes every step (step size `inner_lr`, default `config.inner_lr`). Returns each
    task's mean episode return after 0, 1, …, `adapt_steps` steps and the episodes it is
    over, both [num_tasks, adapt_steps + 1]."""
    config = dataclasses.replace(config, meta_batch_size=num_tasks, inner_steps=adapt_steps,
                                 episodes_per_task=episodes_per_task)
    task_key, sample_key = jax.random.split(key)
    tasks = env.sample_tasks(task_key, num_tasks)
    pre_batches, post_batch = sample_adaptation_phases(env, policy, config, params, tasks,
                                                       sample_key, inner_loss, process,
                                                       inner_lr=inner_lr)
    task_means = jnp.concatenate([pre_batches.mean_episode_return(axis=-1),  # [M, K]
                                  post_batch.mean_episode_return(axis=-1)[:, None]], axis=1)
    episodes = jnp.concatenate([pre_batches.episode_count(axis=-1),
                                post_batch.episode_count(axis=-1)[:, None]], axis=1)
    return AdaptationReturns(task_means=task_means, episodes=episodes)
