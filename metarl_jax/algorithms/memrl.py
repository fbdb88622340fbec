"""MEMRL: first-order meta-RL with Moreau envelopes (Toghani, Perez-Salazar, Uribe 2023),
docs/algorithms.md §3.

With f_i(φ) = −J_i(φ), the meta objective is mean_i F_i(θ), F_i(θ) = min_φ f_i(φ) +
(λ/2)‖φ − θ‖², whose gradient is ∇F_i(θ) = λ (θ − φ_i*(θ)). Per iteration and task:
K proximal policy-gradient steps from φ⁰ = θ, each on fresh on-policy episodes of the
current φ,

    φ^{t+1} = φ^t + α (ĝ_i(φ^t) − λ (φ^t − θ)),

then θ ← θ − β λ mean_i (θ − φ_i^K) (or Adam on that gradient). No second derivative
is taken anywhere: θ enters the inner steps only as the anchor of the proximal term.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from metarl_jax.algorithms.base import MetaLearner, MetaState
from metarl_jax.algorithms.common import (adaptation_returns, phase_returns,
                                          sample_adaptation_phases)
from metarl_jax.config import SamplingConfig, at_least, field, one_of, positive
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import log_likelihood_loss
from metarl_jax.policies import GaussianPolicy


@dataclasses.dataclass(frozen=True)
class MEMRLConfig(SamplingConfig):
    """MEMRL hyperparameters; defaults from the documented sweep on point-nav
    (experiments/README.md). `inner_lr` is α, `inner_steps` is K."""

    inner_steps: int = field(5, **at_least(1))
    proximal_lambda: float = field(2.0, **positive())  # λ
    meta_lr: float = field(1.0, **positive())  # β
    meta_optimizer: str = field("sgd", **one_of("sgd", "adam"))


MEMRLState = MetaState


def proximal_loss(policy: GaussianPolicy, params, batch, anchor, proximal_lambda: float,
                  base_loss=log_likelihood_loss):
    """The inner objective of one MEMRL step, to be minimised over φ:

        L(φ) = f(φ) + (λ/2) ‖φ − θ‖²,   θ = `anchor` (a constant),
        f(φ) = −mean log π_φ(a|s) Â  (`base_loss`, a sampled −J)

    so that φ − α ∇L(φ) = φ + α (ĝ(φ) − λ (φ − θ)), ĝ the policy-gradient estimate.
    """
    anchor = jax.lax.stop_gradient(anchor)
    squared_distance = sum(jnp.sum((p - a) ** 2) for p, a in
                           zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
    return base_loss(policy, params, batch) + 0.5 * proximal_lambda * squared_distance


def moreau_meta_gradient(theta, adapted_per_task, proximal_lambda: float):
    """∇ mean_i F_i(θ) ≈ λ (θ − mean_i φ_i^K), adapted parameters with a leading task axis."""
    return jax.tree.map(lambda t, phi: proximal_lambda * (t - jnp.mean(phi, axis=0)),
                        theta, adapted_per_task)


class MEMRL(MetaLearner):
    name = "memrl"
    config_class = MEMRLConfig

    def __init__(self, config: MEMRLConfig, env: TaskEnv, policy: GaussianPolicy):
        super().__init__(config, env, policy)
        self.optimizer = (optax.sgd(config.meta_lr) if config.meta_optimizer == "sgd"
                          else optax.adam(config.meta_lr))

    def init(self, key: jax.Array) -> MEMRLState:
        init_key, key = jax.random.split(key)
        params = self.policy.init(init_key)
        return MEMRLState(params=params, opt_state=self.optimizer.init(params), key=key,
                          iteration=jnp.zeros((), jnp.int32))

    def inner_loss(self, theta):
        """The proximal inner loss anchored at θ, in the (policy, params, batch) form."""
        lam = self.config.proximal_lambda
        return lambda policy, params, batch: proximal_loss(policy, params, batch, theta, lam)

    def adapt_and_sample(self, theta, tasks, key):
        """K proximal steps from θ on fresh episodes, then the episodes of φ^K.

        Returns (pre_batches [M, K], post_batch [M], φ^K per task [M])."""
        return sample_adaptation_phases(self.env, self.policy, self.config, theta, tasks, key,
                                        self.inner_loss(theta), return_adapted=True)

    def adaptation_returns(self, params, key, num_tasks, adapt_steps, episodes_per_task):
        """The same K proximal steps from θ on new tasks, [num_tasks, adapt_steps + 1]."""
        return adaptation_returns(self.env, self.policy, self.config, params, key, num_tasks,
                                  adapt_steps, episodes_per_task, self.inner_loss(params))

    def meta_iteration(self, state: MEMRLState):
        c = self.config
        key, task_key, sample_key = jax.random.split(state.key, 3)
        tasks = self.env.sample_tasks(task_key, c.meta_batch_size)

        # 1. K proximal policy-gradient steps per task from θ, fresh episodes each.
        pre_batches, post_batch, adapted = self.adapt_and_sample(state.params, tasks,
                                                                 sample_key)

        # 2. The Moreau-envelope meta-gradient λ (θ − mean_i φ_i^K): first order only.
        meta_gradient = moreau_meta_gradient(state.params, adapted, c.proximal_lambda)
        updates, opt_state = self.optimizer.update(meta_gradient, state.opt_state,
                                                   state.params)
        theta = optax.apply_updates(state.params, updates)

        metrics = phase_returns(pre_batches, post_batch)
        distances = jax.vmap(lambda phi: jnp.sqrt(sum(
            jnp.sum((p - t) ** 2) for p, t in
            zip(jax.tree.leaves(phi), jax.tree.leaves(state.params)))))(adapted)
        metrics.update(
            meta_gradient_norm=jnp.sqrt(sum(jnp.sum(g ** 2)
                                            for g in jax.tree.leaves(meta_gradient))),
            proximal_distance=jnp.mean(distances),
            policy_std=jnp.mean(jnp.exp(self.policy.log_std(theta))))
        return MEMRLState(params=theta, opt_state=opt_state, key=key,
                          iteration=state.iteration + 1), metrics
