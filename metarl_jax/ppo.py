"""PPO for GMPS's experts: one Gaussian-MLP policy per task, all tasks trained at once.

`train_experts` gives every task its own policy, value function and optimiser state
(leading axis T); sampling is `rollout.collect(..., per_task_params=True)` and the
per-task update (`PPO.task_update`: GAE, the clipped surrogate of `losses.py`, Adam over
several epochs of shuffled minibatches) is `jax.vmap`-ed over the task axis. One PPO
iteration (sample + update of every expert) is a single jitted program, compiled once
and called `config.iterations` times. The hyperparameters are those of
`metarl_jax.experts.ExpertConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarl_jax.advantages import (baseline_features, discounted_returns, fit_linear_baseline,
                                   generalized_advantages, normalize)
from metarl_jax.config import ConfigError
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import clipped_surrogate, masked_mean
from metarl_jax.policies import ACTIVATIONS, GaussianPolicy, gaussian_entropy, gaussian_log_prob
from metarl_jax.rollout import Trajectories, collect

if TYPE_CHECKING:
    from metarl_jax.experts import ExpertConfig


def resolve_horizon(env: TaskEnv, config: ExpertConfig) -> int:
    """The experts' episode length: `config.horizon`, or the environment's default."""
    return int(config.horizon if config.horizon is not None else env.horizon)


def validate_expert_config(env: TaskEnv, config: ExpertConfig) -> None:
    """Checks that need the environment; raises ConfigError naming the field."""
    samples = config.episodes_per_iteration * resolve_horizon(env, config)
    if config.minibatches > samples:
        raise ConfigError(f"config: minibatches: {config.minibatches} not allowed; expected "
                          f"<= episodes_per_iteration * horizon = {samples}")


def expert_policy(env: TaskEnv, config: ExpertConfig) -> GaussianPolicy:
    """The experts' policy network (one parameter set per task shares it)."""
    return GaussianPolicy(env.observation_size, env.action_size, tuple(config.hidden_sizes),
                          config.activation)


class _ValueMLP(nn.Module):
    """V(s, t/H): an MLP on the observation and the step within the episode over H."""

    hidden_sizes: Sequence[int]
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs, time):
        act = ACTIVATIONS[self.activation]
        x = jnp.concatenate([obs, time[..., None]], axis=-1)
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, kernel_init=nn.initializers.glorot_uniform())(x))
        return nn.Dense(1, kernel_init=nn.initializers.glorot_uniform())(x)[..., 0]


@flax.struct.dataclass
class ExpertTrainState:
    """Every leaf has a leading task axis T."""

    params: Any  # {"policy": GaussianPolicy params, "value": value-MLP params or {}}
    opt_state: Any
    return_mean: jax.Array  # [T] value-target normalisation (baseline="value")
    return_std: jax.Array  # [T]


class PPO:
    """PPO for a stack of independent experts, one per task (leading axis T), each with
    its own policy, value function and Adam state."""

    def __init__(self, env: TaskEnv, policy: GaussianPolicy, config: ExpertConfig):
        self.env, self.policy, self.config = env, policy, config
        self.horizon = resolve_horizon(env, config)
        self.value_net = _ValueMLP(tuple(config.value_hidden_sizes), config.activation)
        adam = optax.adam(config.learning_rate, eps=1e-5)
        self.optimizer = (optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)
                          if config.max_grad_norm > 0 else adam)

    def init(self, key, num_tasks: int) -> ExpertTrainState:
        def one(task_key):
            policy_key, value_key = jax.random.split(task_key)
            params = {"policy": self.policy.init(policy_key), "value": {}}
            if self.config.baseline == "value":
                params["value"] = self.value_net.init(
                    value_key, jnp.zeros((self.policy.observation_size,)), jnp.zeros(()))
            return params, self.optimizer.init(params)

        params, opt_state = jax.vmap(one)(jax.random.split(key, num_tasks))
        return ExpertTrainState(params=params, opt_state=opt_state,
                                return_mean=jnp.zeros((num_tasks,)),
                                return_std=jnp.ones((num_tasks,)))

    def values(self, value_params, observations, timesteps, mean, std):
        """V(s, t/H) with t the step index within the episode (`timesteps`, which
        restarts at 0 wherever a fresh episode starts inside a lane)."""
        time = timesteps.astype(observations.dtype) / self.horizon
        return mean + std * self.value_net.apply(value_params, observations, time), time

    def task_update(self, params, opt_state, return_mean, return_std, batch: Trajectories,
                    key):
        """One task's PPO update from its [N, H] batch."""
        cfg = self.config
        masks, dones = batch.masks, batch.dones
        if cfg.baseline == "linear":
            features = baseline_features(batch.observations, batch.timesteps)
            coeffs = fit_linear_baseline(
                features, discounted_returns(batch.rewards, masks, cfg.discount, dones),
                masks)
            values = (features @ coeffs) * masks
            time = jnp.zeros_like(masks)
        else:
            values, time = self.values(params["value"], batch.observations, batch.timesteps,
                                       return_mean, return_std)
            values = values * masks
        # Within each episode of a lane; the value after an episode's last step is 0.
        advantages = generalized_advantages(batch.rewards, values, masks, cfg.discount,
                                            cfg.gae_lambda, dones)
        targets = (advantages + values) * masks  # λ-returns
        if cfg.baseline == "value":
            return_mean = masked_mean(targets, masks)
            return_std = jnp.maximum(
                jnp.sqrt(masked_mean((targets - return_mean) ** 2, masks)), 1e-3)
        advantages = normalize(advantages, masks)

        def flat(x):
            return x.reshape((-1,) + x.shape[2:])

        data = dict(obs=flat(batch.observations), actions=flat(batch.actions),
                    old_log_probs=flat(batch.log_probs), advantages=flat(advantages),
                    targets=flat((targets - return_mean) / return_std), masks=flat(masks),
                    time=flat(time))
        samples = data["masks"].shape[0]
        size = samples // cfg.minibatches

        def loss_fn(p, mb):
            mean, log_std = self.policy.distribution(p["policy"], mb["obs"])
            log_ratio = gaussian_log_prob(mean, log_std, mb["actions"]) - mb["old_log_probs"]
            ratio = jnp.exp(log_ratio)
            w = mb["masks"]
            surrogate, clip_fraction = clipped_surrogate(ratio, mb["advantages"], w,
                                                         cfg.clip_eps)
            policy_loss = -surrogate
            entropy = masked_mean(gaussian_entropy(log_std), w)
            loss = policy_loss - cfg.entropy_coeff * entropy
            value_loss = jnp.zeros(())
            if cfg.baseline == "value":
                predicted = self.value_net.apply(p["value"], mb["obs"], mb["time"])
                value_loss = masked_mean((predicted - mb["targets"]) ** 2, w)
                loss = loss + cfg.value_coeff * value_loss
            stats = dict(
                policy_loss=policy_loss, value_loss=value_loss, entropy=entropy,
                clip_fraction=clip_fraction, approx_kl=masked_mean(ratio - 1.0 - log_ratio, w))
            return loss, stats

        def minibatch_step(carry, indices):
            p, o = carry
            mb = jax.tree.map(lambda x: x[indices], data)
            grads, stats = jax.grad(loss_fn, has_aux=True)(p, mb)
            updates, o = self.optimizer.update(grads, o, p)
            return (optax.apply_updates(p, updates), o), stats

        def epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, samples)[:size * cfg.minibatches]
            return jax.lax.scan(minibatch_step, carry, order.reshape(cfg.minibatches, size))

        (params, opt_state), stats = jax.lax.scan(epoch, (params, opt_state),
                                                  jax.random.split(key, cfg.epochs))
        stats = jax.tree.map(jnp.mean, stats)
        return params, opt_state, return_mean, return_std, stats

    def iteration(self, state: ExpertTrainState, tasks, key):
        sample_key, update_key = jax.random.split(key)
        num_tasks = state.return_mean.shape[0]
        batch = collect(self.env, self.policy, state.params["policy"], tasks, sample_key,
                        self.config.episodes_per_iteration, self.horizon, per_task_params=True)
        params, opt_state, mean, std, stats = jax.vmap(self.task_update)(
            state.params, state.opt_state, state.return_mean, state.return_std, batch,
            jax.random.split(update_key, num_tasks))
        task_returns = batch.mean_episode_return(axis=1)
        log_std = params["policy"]["params"]["log_std"]
        metrics = {"return": jnp.mean(task_returns), "task_returns": task_returns,
                   "std": jnp.mean(jnp.exp(log_std)),
                   **{name: jnp.mean(value) for name, value in stats.items()}}
        return ExpertTrainState(params, opt_state, mean, std), metrics


def train_experts(env: TaskEnv, tasks, config: ExpertConfig, key: jax.Array,
                  callback: Callable[[int, dict], None] | None = None):
    """Trains one PPO expert per task, all tasks at once.

    Args:
      tasks: a task pytree with leading axis T.
      callback: called after every iteration with (iteration from 1, metrics as floats);
        without it, metrics stay on the device until the end (no per-iteration sync).
    Returns:
      (expert_params, info): the experts' `GaussianPolicy` parameters stacked on a leading
      axis T (policy `expert_policy(env, config)`), and info with `returns` [iterations]
      (mean undiscounted return of the episodes sampled at each iteration, before its
      update, over the episodes `Trajectories.mean_episode_return` counts: returns[0] is
      the initial policies'), `task_returns` [iterations, T],
      `clip_fraction`, `approx_kl`, `std`, `value_loss` [iterations] and `env_steps`
      (T · episodes_per_iteration · horizon per iteration, every step of the fixed
      horizon counted as in the trainer).
    """
    validate_expert_config(env, config)
    num_tasks = int(jax.tree_util.tree_leaves(tasks)[0].shape[0])
    ppo = PPO(env, expert_policy(env, config), config)
    init_key, loop_key = jax.random.split(key)
    state = ppo.init(init_key, num_tasks)
    iteration = jax.jit(ppo.iteration, donate_argnums=0)
    history = []
    for index, iteration_key in enumerate(jax.random.split(loop_key, config.iterations)):
        state, metrics = iteration(state, tasks, iteration_key)
        if callback is not None:
            metrics = jax.device_get(metrics)
            callback(index + 1, {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
        history.append(metrics)
    history = jax.device_get(history)
    info = {name: np.stack([np.asarray(h[name]) for h in history]) for name in history[0]}
    info["returns"] = info.pop("return")
    info["env_steps"] = (config.iterations * num_tasks * config.episodes_per_iteration
                         * ppo.horizon)
    return state.params["policy"], info

