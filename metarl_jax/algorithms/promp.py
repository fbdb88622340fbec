"""ProMP (Rothfuss et al., ICLR 2019) as one compiled meta-iteration, ALGORITHMS.md §1.

Read `ProMP.meta_iteration` top to bottom: sample tasks; K inner phases, each sampling
fresh episodes with the current adapted policy and taking one LVC gradient step; a
post-update phase; P Adam steps on the clipped + KL outer loss, differentiating through
the inner steps re-derived from θ on the stored batches; the adaptive KL rule.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

from metarl_jax.advantages import process_phase
from metarl_jax.config import SamplingConfig, at_least, field, positive
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import inner_update, lvc_inner_loss, promp_outer_loss
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import Trajectories, collect


@dataclasses.dataclass(frozen=True)
class ProMPConfig(SamplingConfig):
    """ProMP hyperparameters; defaults are the reference runs' (ALGORITHMS.md §1)."""

    outer_lr: float = field(1e-3, **positive())
    promp_steps: int = field(5, **at_least(1))
    clip_eps: float = field(0.3, **positive())
    kl_coeff: float = field(5e-4, **at_least(0.0))
    adaptive_kl: bool = False
    kl_target: float = field(0.01, **positive())


@flax.struct.dataclass
class ProMPState:
    params: dict  # θ, the meta-policy
    opt_state: optax.OptState  # Adam's moments persist across iterations
    kl_coeffs: jax.Array  # [K], one c_k per inner step
    key: jax.Array
    iteration: jax.Array


def adapt_kl_coeffs(kl_coeffs: jax.Array, kls: jax.Array, kl_target: float) -> jax.Array:
    """ProMP's adaptive rule, per inner step k: halve c_k if KL_k < target / 1.5,
    double it if KL_k > 1.5 · target, else keep it."""
    kl_coeffs = jnp.where(kls < kl_target / 1.5, kl_coeffs / 2.0, kl_coeffs)
    return jnp.where(kls > kl_target * 1.5, kl_coeffs * 2.0, kl_coeffs)


def broadcast_to_tasks(params, num_tasks: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks,) + x.shape), params)


def sample_adaptation_phases(env: TaskEnv, policy: GaussianPolicy, config: SamplingConfig,
                             theta, tasks, key: jax.Array, inner_loss=lvc_inner_loss):
    """Inner adaptation with fresh episodes at every step, shared by the MAML family.

    For k = 0..K-1: sample a batch with φ_k (φ_0 = θ), compute its advantages, and set
    φ_{k+1} = φ_k − α ∇ L_in(φ_k). Then sample the post-update batch with φ_K.

    Returns:
      (pre_batches with leading axes [M, K] (task-major, as the per-task outer losses
      consume them), post_batch [M]).
    """
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]

    def phase(params, inputs):
        phase_key, is_inner_phase = inputs
        batch = collect(env, policy, params, tasks, phase_key, config.episodes_per_task,
                        config.horizon)
        batch = process_phase(batch, config.discount, config.gae_lambda,
                              config.normalize_advantages)

        def adapt(params):
            return jax.vmap(inner_update, in_axes=(None, None, 0, 0, None))(
                inner_loss, policy, params, batch, config.inner_lr)

        return jax.lax.cond(is_inner_phase, adapt, lambda p: p, params), batch

    # One scan over all K + 1 phases, so the rollout is traced and compiled once (for
    # Brax bodies that halves compile time); the post-update phase skips the step.
    phase_keys = jax.random.split(key, config.inner_steps + 1)
    is_inner_phase = jnp.arange(config.inner_steps + 1) < config.inner_steps
    _, batches = jax.lax.scan(phase, broadcast_to_tasks(theta, num_tasks),
                              (phase_keys, is_inner_phase))
    pre_batches = jax.tree.map(lambda x: jnp.swapaxes(x[:-1], 0, 1), batches)
    post_batch = jax.tree.map(lambda x: x[-1], batches)
    return pre_batches, post_batch


def phase_returns(pre_batches: Trajectories, post_batch: Trajectories) -> dict:
    """Mean undiscounted episode return of every phase: pre (θ), after each step, post."""
    phase_means = jnp.mean(pre_batches.episode_returns(), axis=(0, 2))  # [K]
    metrics = {"pre_return": phase_means[0],
               "post_return": jnp.mean(post_batch.episode_returns())}
    for k in range(1, phase_means.shape[0]):
        metrics[f"return_after_step_{k}"] = phase_means[k]
    return metrics


class ProMP:
    """Builds ProMP's state and its jittable `meta_iteration(state) -> (state, metrics)`."""

    name = "promp"
    config_class = ProMPConfig

    def __init__(self, config: ProMPConfig, env: TaskEnv, policy: GaussianPolicy):
        if config.horizon is None:
            config = dataclasses.replace(config, horizon=env.horizon)
        self.config = config
        self.env = env
        self.policy = policy
        self.optimizer = optax.adam(config.outer_lr, b1=0.9, b2=0.999, eps=1e-8)

    @property
    def env_steps_per_iteration(self) -> int:
        c = self.config
        return c.meta_batch_size * c.episodes_per_task * c.horizon * (c.inner_steps + 1)

    def init(self, key: jax.Array) -> ProMPState:
        init_key, key = jax.random.split(key)
        params = self.policy.init(init_key)
        return ProMPState(
            params=params,
            opt_state=self.optimizer.init(params),
            kl_coeffs=jnp.full((self.config.inner_steps,), self.config.kl_coeff, jnp.float32),
            key=key,
            iteration=jnp.zeros((), jnp.int32))

    def meta_loss(self, theta, pre_batches: Trajectories, post_batch: Trajectories,
                  kl_coeffs: jax.Array):
        """The meta-batch ProMP loss: the per-task outer loss averaged over tasks.

        `pre_batches` has leading axes [M, K]; `post_batch` [M].
        """
        c = self.config
        losses, aux = jax.vmap(promp_outer_loss, in_axes=(None, None, 0, 0, None, None, None))(
            self.policy, theta, pre_batches, post_batch, kl_coeffs, c.inner_lr, c.clip_eps)
        return jnp.mean(losses), jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)

    def adaptation_returns(self, params, key: jax.Array, num_tasks: int, adapt_steps: int,
                           episodes_per_task: int) -> jax.Array:
        """ProMP's own adaptation on freshly sampled tasks: `adapt_steps` LVC steps from θ,
        fresh episodes for every step. Returns the mean episode return of each task
        after 0, 1, …, `adapt_steps` steps, shape [num_tasks, adapt_steps + 1]."""
        config = dataclasses.replace(self.config, meta_batch_size=num_tasks,
                                     inner_steps=adapt_steps,
                                     episodes_per_task=episodes_per_task)
        task_key, sample_key = jax.random.split(key)
        tasks = self.env.sample_tasks(task_key, num_tasks)
        pre_batches, post_batch = sample_adaptation_phases(
            self.env, self.policy, config, params, tasks, sample_key)
        before_last = jnp.mean(pre_batches.episode_returns(), axis=-1)  # [M, K]
        last = jnp.mean(post_batch.episode_returns(), axis=-1)[:, None]
        return jnp.concatenate([before_last, last], axis=1)

    def meta_iteration(self, state: ProMPState):
        c = self.config
        key, task_key, sample_key = jax.random.split(state.key, 3)
        tasks = self.env.sample_tasks(task_key, c.meta_batch_size)

        # 1. Sampling and inner adaptation, fresh episodes for every step.
        pre_batches, post_batch = sample_adaptation_phases(
            self.env, self.policy, c, state.params, tasks, sample_key)

        # 2. P full-batch Adam steps on the same data, each re-deriving φ_k(θ). P is small
        # and static: unrolled, XLA schedules the steps together (≈5 % faster on CPU than
        # a scan, at a slightly longer compile).
        theta, opt_state, losses = state.params, state.opt_state, []
        for _ in range(c.promp_steps):
            (loss, aux), grads = jax.value_and_grad(self.meta_loss, has_aux=True)(
                theta, pre_batches, post_batch, state.kl_coeffs)
            updates, opt_state = self.optimizer.update(grads, opt_state, theta)
            theta = optax.apply_updates(theta, updates)
            losses.append(loss)

        # 3. KL coefficients from the KLs of the last outer step (`aux`, as the reference
        # code does).
        last_kls = aux["kls"]
        kl_coeffs = (adapt_kl_coeffs(state.kl_coeffs, last_kls, c.kl_target)
                     if c.adaptive_kl else state.kl_coeffs)

        metrics = phase_returns(pre_batches, post_batch)
        metrics.update(
            outer_loss_first=losses[0],
            outer_loss=losses[-1],
            surrogate=aux["surrogate"],
            clip_fraction=aux["clip_fraction"],
            kl=last_kls,
            kl_coeff=state.kl_coeffs,
            policy_std=jnp.mean(jnp.exp(theta["params"]["log_std"])),
        )
        new_state = ProMPState(params=theta, opt_state=opt_state, kl_coeffs=kl_coeffs,
                               key=key, iteration=state.iteration + 1)
        return new_state, metrics
