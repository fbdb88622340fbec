"""ProMP (Rothfuss et al., ICLR 2019) as one compiled meta-iteration, docs/algorithms.md §1.

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

from metarl_jax.algorithms.base import MetaLearner, MetaState
from metarl_jax.algorithms.common import (adaptation_returns, phase_returns,
                                          sample_adaptation_phases)
from metarl_jax.config import SamplingConfig, at_least, field, positive
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import promp_outer_loss
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import Trajectories


@dataclasses.dataclass(frozen=True)
class ProMPConfig(SamplingConfig):
    """ProMP hyperparameters; defaults are the reference runs' (docs/algorithms.md §1)."""

    outer_lr: float = field(1e-3, **positive())
    promp_steps: int = field(5, **at_least(1))
    clip_eps: float = field(0.3, **positive())
    kl_coeff: float = field(5e-4, **at_least(0.0))
    adaptive_kl: bool = False
    kl_target: float = field(0.01, **positive())


@flax.struct.dataclass
class ProMPState(MetaState):
    kl_coeffs: jax.Array  # [K], one c_k per inner step (Adam's moments in opt_state)


def adapt_kl_coeffs(kl_coeffs: jax.Array, kls: jax.Array, kl_target: float) -> jax.Array:
    """ProMP's adaptive rule, per inner step k: halve c_k if KL_k < target / 1.5,
    double it if KL_k > 1.5 · target, else keep it."""
    kl_coeffs = jnp.where(kls < kl_target / 1.5, kl_coeffs / 2.0, kl_coeffs)
    return jnp.where(kls > kl_target * 1.5, kl_coeffs * 2.0, kl_coeffs)


class ProMP(MetaLearner):
    """Builds ProMP's state and its jittable `meta_iteration(state) -> (state, metrics)`."""

    name = "promp"
    config_class = ProMPConfig

    def __init__(self, config: ProMPConfig, env: TaskEnv, policy: GaussianPolicy):
        super().__init__(config, env, policy)
        self.optimizer = optax.adam(config.outer_lr, b1=0.9, b2=0.999, eps=1e-8)

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

    def adaptation_returns(self, params, key, num_tasks, adapt_steps, episodes_per_task):
        """Returns after 0..`adapt_steps` LVC steps on new tasks, [num_tasks, steps + 1]."""
        return adaptation_returns(self.env, self.policy, self.config, params, key, num_tasks,
                                  adapt_steps, episodes_per_task)

    def meta_iteration(self, state: ProMPState):
        c = self.config
        key, task_key, sample_key = jax.random.split(state.key, 3)
        tasks = self.env.sample_tasks(task_key, c.meta_batch_size)

        # 1. Sampling and inner adaptation, fresh episodes for every step.
        pre_batches, post_batch = sample_adaptation_phases(
            self.env, self.policy, c, state.params, tasks, sample_key)

        # 2. P full-batch Adam steps on the same data, each re-deriving φ_k(θ). P is small
        # and static: unrolled, XLA schedules the steps together (faster on CPU than a
        # scan, at a slightly longer compile).
        theta, opt_state, losses = state.params, state.opt_state, []
        for _ in range(c.promp_steps):
            (loss, aux), grads = jax.value_and_grad(self.meta_loss, has_aux=True)(
                theta, pre_batches, post_batch, state.kl_coeffs)
            updates, opt_state = self.optimizer.update(grads, opt_state, theta)
            theta = optax.apply_updates(theta, updates)
            losses.append(loss)

        # 3. The adaptive rule reads the inner KLs at the final θ, recomputed after the
        # last Adam step as the reference does (its `compute_stats`); the fixed
        # coefficients need no extra pass, and `kl` then reports the last step's KLs.
        last_kls = aux["kls"]
        kl_coeffs = state.kl_coeffs
        if c.adaptive_kl:
            last_kls = self.meta_loss(theta, pre_batches, post_batch, state.kl_coeffs)[1]["kls"]
            kl_coeffs = adapt_kl_coeffs(state.kl_coeffs, last_kls, c.kl_target)

        metrics = phase_returns(pre_batches, post_batch)
        metrics.update(
            outer_loss_first=losses[0],
            outer_loss=losses[-1],
            surrogate=aux["surrogate"],
            clip_fraction=aux["clip_fraction"],
            kl=last_kls,
            kl_coeff=state.kl_coeffs,
            policy_std=jnp.mean(jnp.exp(self.policy.log_std(theta))),
        )
        new_state = ProMPState(params=theta, opt_state=opt_state, kl_coeffs=kl_coeffs,
                               key=key, iteration=state.iteration + 1)
        return new_state, metrics
