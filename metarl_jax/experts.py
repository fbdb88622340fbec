"""GMPS phase 1: per-task PPO experts and demonstration files.

Experts
-------
`train_experts` trains one Gaussian-MLP policy per task with PPO (clipped surrogate, GAE,
Adam, several epochs of shuffled minibatches), for ALL tasks at once: every task has its
own policy, value function and optimiser state (leading axis T), sampling is
`rollout.collect(..., per_task_params=True)` and the per-task update is `jax.vmap`-ed over
the task axis. One PPO iteration (sample + update of every expert) is a single jitted
program, compiled once and called `config.iterations` times.

Demonstrations
--------------
`collect_demonstrations` rolls each expert out on its own task and keeps the real
(unmasked) steps. `save_demonstrations` / `load_demonstrations` write and read them as an
`.npz` archive (numpy only; loaded with `allow_pickle=False`, so loading never runs code).

File format (version 1); T tasks, D steps per task (the largest count, see `counts`):

    format_version       int, 0-d           1 (optional on load; any other value is refused)
    env                  str, 0-d           environment name, e.g. "point-nav"
    observations         float32 [T, D, O]  states visited by expert i on task i
    actions              float32 [T, D, A]  the expert's action label at those states, in
                                            the policy's raw action space (before any env
                                            scaling), clipped to the environment's raw
                                            action bound (`TaskEnv.raw_action_bound`)
    counts               int64 [T]          real steps of task i, 1 <= counts[i] <= D; rows
                                            counts[i]..D-1 repeat the last real step
    task.<leaf>          [T, ...]           each leaf of the task pytree, e.g. `task.goal`
                                            [T, 2] (point-nav), `task.direction` [T]
    expert.<path>        [T, ...]           optional: the experts' policy parameters, one
                                            array per leaf of `GaussianPolicy.init`'s pytree,
                                            e.g. `expert.params.Dense_0.kernel` [T, O, 64]
    expert_hidden_sizes  int64 [L]          with expert.*: the experts' hidden widths
    expert_activation    str, 0-d           with expert.*: "tanh" or "relu" (default tanh)
    expert_env_steps     int64, 0-d         environment steps spent on the experts
                                            (training and demonstration rollouts)

Nested pytree keys are joined with "." (`task.a.b`). Unknown top-level keys are ignored;
unknown `task.*` or `expert.*` keys are errors. Padding rows repeat real steps, so a reader
that ignores `counts` over-weights the last step of a short task but never sees garbage.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarl_jax.advantages import (baseline_features, discounted_returns, fit_linear_baseline,
                                   generalized_advantages, normalize)
from metarl_jax.config import (ConfigError, EnvConfig, at_least, build_dataclass, check, field,
                               one_of, positive, unit_interval)
from metarl_jax.envs import ENVIRONMENTS, env_names, make_env
from metarl_jax.envs.base import TaskEnv
from metarl_jax.policies import ACTIVATIONS, GaussianPolicy, gaussian_entropy, gaussian_log_prob
from metarl_jax.rollout import Trajectories, collect

FORMAT_VERSION = 1
# log σ used for deterministic (mean-action) rollouts: exp(-30) ≈ 1e-13.
_DETERMINISTIC_LOG_STD = -30.0


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


def resolve_horizon(env: TaskEnv, config: ExpertConfig) -> int:
    return int(config.horizon if config.horizon is not None else env.horizon)


def validate_expert_config(env: TaskEnv, config: ExpertConfig) -> None:
    """Checks that need the environment; raises ConfigError naming the field."""
    samples = config.episodes_per_iteration * resolve_horizon(env, config)
    if config.minibatches > samples:
        raise ConfigError(f"config: minibatches: {config.minibatches} not allowed; expected "
                          f"<= episodes_per_iteration * horizon = {samples}")


def expert_policy(env: TaskEnv, config: ExpertConfig) -> GaussianPolicy:
    return GaussianPolicy(env.observation_size, env.action_size, tuple(config.hidden_sizes),
                          config.activation)


# --- PPO, vmapped over tasks ------------------------------------------------------------


class _ValueMLP(nn.Module):
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


def _masked_mean(x, weights):
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class _PPO:
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
            return_mean = _masked_mean(targets, masks)
            return_std = jnp.maximum(
                jnp.sqrt(_masked_mean((targets - return_mean) ** 2, masks)), 1e-3)
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
            surrogate = jnp.minimum(
                ratio * mb["advantages"],
                jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * mb["advantages"])
            w = mb["masks"]
            policy_loss = -_masked_mean(surrogate, w)
            entropy = _masked_mean(gaussian_entropy(log_std), w)
            loss = policy_loss - cfg.entropy_coeff * entropy
            value_loss = jnp.zeros(())
            if cfg.baseline == "value":
                predicted = self.value_net.apply(p["value"], mb["obs"], mb["time"])
                value_loss = _masked_mean((predicted - mb["targets"]) ** 2, w)
                loss = loss + cfg.value_coeff * value_loss
            stats = dict(
                policy_loss=policy_loss, value_loss=value_loss, entropy=entropy,
                clip_fraction=_masked_mean((jnp.abs(ratio - 1.0) > cfg.clip_eps)
                                           .astype(ratio.dtype), w),
                approx_kl=_masked_mean(ratio - 1.0 - log_ratio, w))
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
    ppo = _PPO(env, expert_policy(env, config), config)
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


# --- demonstrations -----------------------------------------------------------------------


class DemonstrationBatch(NamedTuple):
    observations: np.ndarray  # float32 [T, D, obs]
    actions: np.ndarray  # float32 [T, D, act]
    counts: np.ndarray  # int64 [T]
    returns: np.ndarray  # float32 [T], mean undiscounted episode return per task
    env_steps: int  # T · episodes_per_task · horizon


def _replace_log_std(params, value: float):
    def replace(path, leaf):
        name = getattr(path[-1], "key", None)
        return jnp.full_like(leaf, value) if name == "log_std" else leaf

    return jax.tree_util.tree_map_with_path(replace, params)


def collect_demonstrations(env: TaskEnv, policy: GaussianPolicy, expert_params, tasks,
                           key: jax.Array, episodes_per_task: int, horizon: int,
                           deterministic: bool = False) -> DemonstrationBatch:
    """Rolls expert i out on task i and keeps the real (unmasked) steps.

    The states are those visited by the expert acting *stochastically* (its Gaussian),
    or with its mean action when `deterministic`. The action label recorded at every
    state is the expert's *mean* action there (deterministic, noise-free: what GMPS's
    outer loss ||μ_θ'(s) − a*||² regresses on), in the policy's raw action space,
    clipped to the environment's raw action bound: beyond it the environment clips, so
    a larger label would only ask the meta-policy for an action that acts the same.

    Episodes are concatenated per task in order, masked steps removed; tasks with fewer
    real steps than the longest are padded by repeating their last real step, and
    `counts` holds the real steps per task.
    """
    params = _replace_log_std(expert_params, _DETERMINISTIC_LOG_STD) if deterministic \
        else expert_params
    batch = jax.jit(collect, static_argnums=(0, 1, 5, 6))(
        env, policy, params, tasks, key, episodes_per_task, horizon)
    observations = np.asarray(batch.observations, np.float32)
    means = np.asarray(clip_to_action_bound(batch.means, env.raw_action_bound()), np.float32)
    masks = np.asarray(batch.masks)
    num_tasks = masks.shape[0]
    flat_masks = masks.reshape(num_tasks, -1) > 0
    counts = flat_masks.sum(axis=1).astype(np.int64)
    size = int(counts.max())
    obs_out = np.empty((num_tasks, size, observations.shape[-1]), np.float32)
    act_out = np.empty((num_tasks, size, means.shape[-1]), np.float32)
    for task in range(num_tasks):
        real = np.flatnonzero(flat_masks[task])
        real = np.concatenate([real, np.full(size - real.size, real[-1])])
        obs_out[task] = observations[task].reshape(-1, observations.shape[-1])[real]
        act_out[task] = means[task].reshape(-1, means.shape[-1])[real]
    returns = np.asarray(batch.mean_episode_return(axis=1), np.float32)
    return DemonstrationBatch(obs_out, act_out, counts, returns,
                              num_tasks * episodes_per_task * horizon)


def clip_to_action_bound(actions, bound: float | None):
    """`actions` clipped to [-bound, bound] per coordinate; unchanged when bound is None
    (an environment that does not clip, `TaskEnv.raw_action_bound`)."""
    return actions if bound is None else jnp.clip(actions, -bound, bound)


def expert_actions(policy: GaussianPolicy, expert_params, task_indices, observations,
                   action_bound: float | None = None):
    """The experts' mean actions, for DAgger labelling.

    Args:
      expert_params: stacked experts, leading axis T.
      task_indices: int [B], which expert labels each row.
      observations: [B, ..., obs].
      action_bound: the environment's raw action bound; the labels are clipped to it.
    Returns:
      [B, ..., act]: μ_{expert task_indices[b]}(observations[b]), clipped.
    """
    selected = jax.tree.map(lambda leaf: leaf[jnp.asarray(task_indices)], expert_params)
    means = jax.vmap(lambda p, o: policy.distribution(p, o)[0])(selected, observations)
    return clip_to_action_bound(means, action_bound)


# --- the file format ----------------------------------------------------------------------


@dataclasses.dataclass
class Demonstrations:
    """A loaded demonstrations file (numpy arrays; see the module docstring)."""

    env_name: str
    observations: np.ndarray  # float32 [T, D, obs]
    actions: np.ndarray  # float32 [T, D, act]
    counts: np.ndarray  # int64 [T]
    tasks: Any  # task pytree, leaves [T, ...]
    expert_params: Any | None  # GaussianPolicy params, leaves [T, ...], or None
    hidden_sizes: tuple[int, ...] | None
    activation: str = "tanh"
    expert_env_steps: int = 0

    @property
    def num_tasks(self) -> int:
        return int(self.counts.shape[0])

    def masks(self) -> np.ndarray:
        """float32 [T, D]: 1 on real steps, 0 on padding."""
        steps = np.arange(self.observations.shape[1])
        return (steps[None, :] < self.counts[:, None]).astype(np.float32)

    def expert_policy(self, env: TaskEnv) -> GaussianPolicy | None:
        if self.hidden_sizes is None:
            return None
        return GaussianPolicy(env.observation_size, env.action_size, self.hidden_sizes,
                              self.activation)


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {f"{prefix}.{_path_name(path)}": np.asarray(leaf) for path, leaf in leaves}


def save_demonstrations(path, env_name: str, tasks, observations, actions, counts,
                        expert_params=None, hidden_sizes: Sequence[int] | None = None,
                        expert_env_steps: int = 0, activation: str = "tanh") -> str:
    """Writes the demonstrations file (format in the module docstring) to exactly `path`
    (no ".npz" is appended), atomically. Returns the path."""
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION, np.int64),
        "env": np.asarray(str(env_name)),
        "observations": np.asarray(observations, np.float32),
        "actions": np.asarray(actions, np.float32),
        "counts": np.asarray(counts, np.int64),
        "expert_env_steps": np.asarray(int(expert_env_steps), np.int64),
        **_flatten("task", tasks),
    }
    if expert_params is not None:
        if hidden_sizes is None:
            raise ValueError("save_demonstrations: expert_params needs hidden_sizes")
        arrays.update(_flatten("expert", expert_params))
        arrays["expert_hidden_sizes"] = np.asarray(tuple(hidden_sizes), np.int64)
        arrays["expert_activation"] = np.asarray(str(activation))
    _check_core(arrays, str(path))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        np.savez(f, **arrays)
    os.replace(temporary, path)
    return path


def _error(source: str, message: str) -> ConfigError:
    return ConfigError(f"demonstrations {source}: {message}")


def _read_arrays(path) -> dict[str, np.ndarray]:
    source = os.fspath(path)
    try:
        archive = np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise _error(source, "no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _error(source, f"not a valid .npz archive ({str(error).splitlines()[0]})"
                     ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _error(source, "not a valid .npz archive (a single .npy array)")
    arrays = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise _error(source, f"{name}: object arrays are not allowed (pickled "
                                         "data is never loaded)") from None
                raise _error(source, f"{name}: unreadable ({str(error).splitlines()[0]})"
                             ) from None
            except (OSError, EOFError, zipfile.BadZipFile) as error:
                raise _error(source, f"{name}: unreadable ({str(error).splitlines()[0]})"
                             ) from None
    return arrays


def _numeric(arrays, name, source, kind="float") -> np.ndarray:
    value = arrays[name]
    if kind == "int":
        if not np.issubdtype(value.dtype, np.integer):
            raise _error(source, f"{name}: expected integers, got dtype {value.dtype}")
        return value
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise _error(source, f"{name}: expected numbers, got dtype {value.dtype}")
    if not np.all(np.isfinite(value)):
        raise _error(source, f"{name}: contains non-finite values")
    return value


def _string(arrays, name, source) -> str:
    value = arrays[name]
    if value.ndim != 0 or value.dtype.kind != "U":
        raise _error(source, f"{name}: expected a 0-d string array, got dtype {value.dtype} "
                             f"shape {list(value.shape)}")
    return str(value)


def _check_core(arrays: dict, source: str) -> None:
    """Checks that need no environment: keys, ranks, consistent T, counts, finiteness."""
    for name in ("env", "observations", "actions", "counts"):
        if name not in arrays:
            raise _error(source, f"missing {name!r}")
    if "format_version" in arrays:
        version = arrays["format_version"]
        if version.ndim != 0 or not np.issubdtype(version.dtype, np.integer) \
                or int(version) != FORMAT_VERSION:
            raise _error(source, f"format_version: {version!r} not supported; expected "
                                 f"{FORMAT_VERSION}")
    _string(arrays, "env", source)
    observations = _numeric(arrays, "observations", source)
    actions = _numeric(arrays, "actions", source)
    counts = _numeric(arrays, "counts", source, kind="int")
    for name, value, rank in (("observations", observations, 3), ("actions", actions, 3),
                              ("counts", counts, 1)):
        if value.ndim != rank:
            axes = "[T]" if rank == 1 else "[T, D, size]"
            raise _error(source, f"{name}: expected rank {rank} {axes}, got shape "
                                 f"{list(value.shape)}")
    num_tasks, steps = observations.shape[:2]
    if num_tasks < 1 or steps < 1:
        raise _error(source, f"observations: empty, shape {list(observations.shape)}")
    for name in ("actions", "counts"):
        if arrays[name].shape[0] != num_tasks:
            raise _error(source, f"{name}: {arrays[name].shape[0]} tasks but observations has "
                                 f"{num_tasks} (T must agree)")
    if actions.shape[1] != steps:
        raise _error(source, f"actions: {actions.shape[1]} steps per task but observations "
                             f"has {steps} (D must agree)")
    if np.any(counts < 1) or np.any(counts > steps):
        raise _error(source, f"counts: out of range; expected 1 <= counts <= D = {steps}, "
                             f"got min {int(counts.min())} max {int(counts.max())}")
    for name, value in arrays.items():
        if name.startswith(("task.", "expert.")):
            _numeric(arrays, name, source)
            if value.ndim < 1 or value.shape[0] != num_tasks:
                raise _error(source, f"{name}: leading axis must be T = {num_tasks}, got shape "
                                     f"{list(value.shape)}")
    if "expert_env_steps" in arrays:
        value = _numeric(arrays, "expert_env_steps", source, kind="int")
        if value.ndim != 0 or int(value) < 0:
            raise _error(source, "expert_env_steps: expected a 0-d integer >= 0")


def _unflatten(arrays, prefix: str, template, num_tasks: int, source: str):
    """Rebuilds `template`'s pytree from `prefix.<path>` arrays, checking shapes [T, ...]."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {f"{prefix}.{_path_name(path)}": leaf for path, leaf in leaves}
    for name in sorted(expected):
        if name not in arrays:
            raise _error(source, f"missing {name!r}")
        shape = (num_tasks,) + tuple(expected[name].shape)
        if arrays[name].shape != shape:
            raise _error(source, f"{name}: expected shape {list(shape)}, got "
                                 f"{list(arrays[name].shape)}")
    unknown = sorted(n for n in arrays if n.startswith(prefix + ".") and n not in expected)
    if unknown:
        raise _error(source, f"{unknown[0]}: unknown {prefix} leaf; expected "
                             + ", ".join(sorted(expected)))
    return jax.tree_util.tree_unflatten(treedef, [
        arrays[name].astype(expected[name].dtype)
        for name in (f"{prefix}.{_path_name(path)}" for path, _ in leaves)])


def load_demonstrations(path, env: TaskEnv) -> Demonstrations:
    """Reads and validates a demonstrations file for `env`.

    Raises ConfigError ("demonstrations PATH: FIELD: ...", one line) when the file is not
    an .npz archive, holds pickled objects, lacks a key, was written for another
    environment, has wrong ranks or sizes, inconsistent T, task leaves not matching
    `env.sample_tasks`, counts out of range, or non-finite values. Never unpickles.
    """
    source = os.fspath(path)
    arrays = _read_arrays(path)
    _check_core(arrays, source)
    env_name = _string(arrays, "env", source)
    accepted = (env.name, *env.demonstration_sources)
    if env_name not in accepted:
        raise _error(source, f"env: written for {env_name!r}; {env.name} accepts "
                             f"demonstrations of {', '.join(repr(n) for n in accepted)}")
    observations = arrays["observations"].astype(np.float32)
    actions = arrays["actions"].astype(np.float32)
    counts = arrays["counts"].astype(np.int64)
    num_tasks = observations.shape[0]
    if observations.shape[2] != env.observation_size:
        raise _error(source, f"observations: size {observations.shape[2]} but {env.name} "
                             f"observations have {env.observation_size}")
    if actions.shape[2] != env.action_size:
        raise _error(source, f"actions: size {actions.shape[2]} but {env.name} actions have "
                             f"{env.action_size}")
    task_template = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype),
        jax.eval_shape(lambda key: env.sample_tasks(key, 1), jax.random.PRNGKey(0)))
    tasks = _unflatten(arrays, "task", task_template, num_tasks, source)

    expert_params, hidden_sizes, activation = None, None, "tanh"
    has_experts = any(name.startswith("expert.") for name in arrays)
    if has_experts or "expert_hidden_sizes" in arrays:
        if "expert_hidden_sizes" not in arrays:
            raise _error(source, "missing 'expert_hidden_sizes' (needed with expert.* arrays)")
        sizes = _numeric(arrays, "expert_hidden_sizes", source, kind="int")
        if sizes.ndim != 1 or sizes.size < 1 or np.any(sizes < 1):
            raise _error(source, "expert_hidden_sizes: expected a non-empty list of widths "
                                 f">= 1, got {sizes.tolist()}")
        hidden_sizes = tuple(int(w) for w in sizes)
        if "expert_activation" in arrays:
            activation = _string(arrays, "expert_activation", source)
            if activation not in ACTIVATIONS:
                raise _error(source, f"expert_activation: {activation!r} not allowed; "
                                     f"expected one of {', '.join(ACTIVATIONS)}")
        policy = GaussianPolicy(env.observation_size, env.action_size, hidden_sizes,
                                activation)
        template = jax.eval_shape(policy.init, jax.random.PRNGKey(0))
        expert_params = _unflatten(arrays, "expert", template, num_tasks, source)
    steps = int(arrays["expert_env_steps"]) if "expert_env_steps" in arrays else 0
    return Demonstrations(env_name=env_name, observations=observations, actions=actions,
                          counts=counts, tasks=tasks, expert_params=expert_params,
                          hidden_sizes=hidden_sizes, activation=activation,
                          expert_env_steps=steps)


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
    if env_config.name not in ENVIRONMENTS:
        raise ConfigError(f"config: env.name: unknown environment {env_config.name!r}; "
                          f"allowed: {', '.join(env_names())}")
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

    params, info = train_experts(env, tasks, config, train_key,
                                 callback=progress if log is not None else None)
    policy = expert_policy(env, config)
    demos = collect_demonstrations(env, policy, params, tasks, demo_key, config.demos_per_task,
                                   resolve_horizon(env, config), config.deterministic_demos)
    env_steps = int(info["env_steps"]) + demos.env_steps
    path = save_demonstrations(out_path, env.name, tasks, demos.observations, demos.actions,
                               demos.counts, expert_params=params,
                               hidden_sizes=config.hidden_sizes, expert_env_steps=env_steps,
                               activation=config.activation)
    return {"path": path, "num_tasks": config.num_tasks,
            "initial_return": float(info["returns"][0]),
            "final_return": float(np.mean(demos.returns)),
            "task_returns": demos.returns.tolist(),
            "training_env_steps": int(info["env_steps"]), "env_steps": env_steps,
            "steps_per_task": int(demos.observations.shape[1]),
            "real_steps": int(demos.counts.sum())}


__all__ = ["FORMAT_VERSION", "DemonstrationBatch", "Demonstrations", "ExpertConfig",
           "ExpertTrainState", "clip_to_action_bound", "collect_demonstrations",
           "expert_actions", "expert_policy", "load_demonstrations", "resolve_expert_config", "resolve_horizon", "run_experts",
           "save_demonstrations", "train_experts", "validate_expert_config"]
