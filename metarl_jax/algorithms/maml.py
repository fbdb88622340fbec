"""The MAML family: the baselines of the ProMP paper, each a composition of parts.

| algo        | inner loss          | outer loss on post-update samples         | outer step |
|-------------|---------------------|-------------------------------------------|------------|
| maml-trpo   | log-likelihood (LL) | −mean(r' Â')                              | TRPO       |
| maml-vpg    | LL                  | −mean(log π_φK(a'|s') Â')                 | Adam, 1    |
| emaml-trpo  | LL                  | as maml-trpo + E-MAML exploration term    | TRPO       |
| emaml-vpg   | LL                  | as maml-vpg + E-MAML exploration term     | Adam, 1    |
| lvc-trpo    | LVC (ratio)         | as maml-trpo                              | TRPO       |
| lvc-vpg     | LVC (ratio)         | as maml-vpg                               | Adam, 1    |
| dice-vpg    | DiCE                | DiCE                                      | Adam, 1    |

A row is a `MAMLParts`: the inner `Objective`, the outer `Objective`, the `OuterStep`
(`TRPO` or `VPG`), the optional exploration term and the advantage estimator that fills
`batch.advantages`. One `MAMLFamily` class runs any composition; each `--algo` name is a
subclass that names its parts and its configuration class.

Every variant takes `first_order: true` (the inner gradient treated as a constant). The
TRPO variants also take `averaging` and `kl_direction` (`MAMLTRPOConfig`). Sampling,
advantages and the inner steps are those of ProMP (`common.py`); only the
losses and the outer optimiser differ. Read `MAMLFamily.meta_iteration` top to bottom.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metarl_jax.advantages import dice_adjusted_rewards
from metarl_jax.algorithms.base import MetaLearner, MetaState
from metarl_jax.algorithms.common import (adaptation_returns,
                                          broadcast_to_tasks, phase_returns,
                                          sample_adaptation_phases, standard_advantages)
from metarl_jax.config import SamplingConfig, at_least, check, field, one_of, positive
from metarl_jax.envs.base import TaskEnv
from metarl_jax.losses import (AVERAGES, KL_DIRECTIONS, dice_loss, episode_weights,
                               inner_update, kl_to_sampler, likelihood_ratio_loss,
                               likelihood_ratio_loss_per_episode, log_likelihood_loss,
                               log_likelihood_loss_per_episode, masked_mean)
from metarl_jax.optim import gaussian_fisher_diagonal, trpo_step
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import Trajectories


@dataclasses.dataclass(frozen=True)
class MAMLVPGConfig(SamplingConfig):
    """VPG-style outer step: one Adam step on the outer loss."""

    outer_lr: float = field(1e-3, **positive())
    first_order: bool = False


@dataclasses.dataclass(frozen=True)
class DiCEConfig(MAMLVPGConfig):
    # Subtract the linear feature baseline fitted to γ^t r_t from the DiCE rewards.
    dice_baseline: bool = True


@dataclasses.dataclass(frozen=True)
class MAMLTRPOConfig(SamplingConfig):
    """TRPO outer step: a natural-gradient step on the outer surrogate, with the mean KL
    between the sampling and the new post-update policies kept within `max_kl`.

    Two choices where the public implementations differ, ProMP's code the default:

    - `averaging`: how the inner loss, the outer surrogate and the KL average over a
      task's batch. "steps": over every real step (ProMP's code). "episodes": each
      episode over its own steps, then over the episodes (pytorch-maml-rl's
      `weighted_mean`), so an episode that ended early weighs as much as a long one.
    - `kl_direction`: the KL of the constraint. "old_new": KL(π_old ‖ π_new) (ProMP's
      code). "new_old": KL(π_new ‖ π_old) (pytorch-maml-rl's). Both have the same
      Hessian at θ_old, so only the line search's acceptance differs.
    """

    max_kl: float = field(0.01, **positive())
    cg_iterations: int = field(10, **at_least(1))
    cg_damping: float = field(1e-5, **at_least(0.0))
    backtrack_ratio: float = field(0.8, **check(lambda v: 0 < v < 1, "in (0, 1)"))
    max_backtracks: int = field(15, **at_least(1))
    first_order: bool = False
    averaging: str = field("steps", **one_of(*AVERAGES))
    kl_direction: str = field("old_new", **one_of(*KL_DIRECTIONS))


# opt_state: Adam's state for the VPG variants, a placeholder for TRPO.
MAMLState = MetaState


def normalized_post_rewards(post_batch: Trajectories) -> jax.Array:
    """E-MAML's reward signal R̃'_i, [M]: the post-update rewards normalised per step
    over every real step of the meta-batch (zero mean, unit std), then averaged over
    task i's real steps; as ProMP's sample processor computes `adj_avg_rewards`."""
    masks, rewards = post_batch.masks, post_batch.rewards
    count = jnp.maximum(jnp.sum(masks), 1.0)
    mean = jnp.sum(rewards * masks) / count
    std = jnp.sqrt(jnp.sum(masks * (rewards - mean) ** 2) / count)
    normalized = (rewards - mean) / (std + 1e-8)
    return jax.vmap(masked_mean)(normalized, masks)


def emaml_exploration_term(policy: GaussianPolicy, theta, first_batch: Trajectories,
                           post_reward: jax.Array) -> jax.Array:
    """E-MAML's exploration term (Stadie et al. 2018) for ONE task, as ProMP's code
    adds it to the outer loss:

        − R̃'_i · mean_{(s,a) ∈ step-0 batch} log π_θ(a|s)

    R̃'_i (`normalized_post_rewards`) is a constant: the term's gradient credits θ's
    sampling for the post-update reward it led to. Only the step-0 batch enters, with
    K > 1 too.
    """
    log_probs = policy.log_prob(theta, first_batch.observations, first_batch.actions)
    return -post_reward * masked_mean(log_probs, first_batch.masks)


# --- the parts ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """A per-task loss `(policy, params, batch) -> scalar` (`metarl_jax.losses`), in the
    two averages over a task's batch the TRPO variants choose between (`averaging`):
    `per_step` over every real step, `per_episode` per episode and then over the
    episodes (None where only the former exists)."""

    name: str
    per_step: Callable
    per_episode: Callable | None = None

    def averaged(self, averaging: str) -> Callable:
        return self.per_episode if averaging == "episodes" else self.per_step


LOG_LIKELIHOOD = Objective("ll", log_likelihood_loss, log_likelihood_loss_per_episode)
# The likelihood-ratio loss in its two roles: ProMP's LVC inner loss, and the outer
# surrogate −mean(r' Â') of the TRPO variants.
LVC = Objective("lvc", likelihood_ratio_loss, likelihood_ratio_loss_per_episode)
SURROGATE = Objective("ratio", likelihood_ratio_loss, likelihood_ratio_loss_per_episode)
DICE = Objective("dice", dice_loss)


def dice_advantages(batch: Trajectories, config: DiCEConfig) -> Trajectories:
    """DiCE's adjusted rewards γ^t r_t − b_t in `batch.advantages`
    (`metarl_jax.advantages.dice_adjusted_rewards`)."""
    return dice_adjusted_rewards(batch, config.discount, config.dice_baseline,
                                 config.normalize_advantages)


@dataclasses.dataclass(frozen=True)
class OuterStep:
    """How θ moves on the meta-loss, as a pair of pure functions (optax's style):

      init(config, params) -> optimiser state
      update(learner, params, opt_state, pre_batches, post_batch)
          -> (new params, new optimiser state, metrics)

    `learner` is the `MAMLFamily` whose `meta_loss` (and, for TRPO, `meta_kl` and
    `meta_kl_hvp`) the step uses.
    """

    name: str
    init: Callable
    update: Callable


def vpg_optimizer(config: MAMLVPGConfig) -> optax.GradientTransformation:
    """Adam at `outer_lr` with the default moments (0.9, 0.999) and ε = 1e-8."""
    return optax.adam(config.outer_lr, b1=0.9, b2=0.999, eps=1e-8)


def vpg_init(config: MAMLVPGConfig, params) -> optax.OptState:
    """Adam's state for `params`."""
    return vpg_optimizer(config).init(params)


def vpg_update(learner, params, opt_state, pre_batches, post_batch):
    """One Adam step on the meta-loss; metrics `outer_loss` (before the step) and
    `grad_norm` (the meta-gradient's global norm)."""
    loss, grads = jax.value_and_grad(
        lambda theta: learner.meta_loss(theta, pre_batches, post_batch)[0])(params)
    updates, opt_state = vpg_optimizer(learner.config).update(grads, opt_state, params)
    theta = optax.apply_updates(params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
    return theta, opt_state, {"outer_loss": loss, "grad_norm": grad_norm}


def trpo_init(config: MAMLTRPOConfig, params) -> jax.Array:
    """TRPO keeps no optimiser state: a placeholder."""
    return jnp.zeros(())


def trpo_update(learner, params, opt_state, pre_batches, post_batch):
    """A natural-gradient step on the meta-loss within `max_kl` of the sampling
    post-update policies (`metarl_jax.optim.trpo_step`, the KL's Hessian-vector product
    from `MAMLFamily.meta_kl_hvp`); metrics from its line search."""
    c = learner.config
    theta, info = trpo_step(
        lambda theta: learner.meta_loss(theta, pre_batches, post_batch)[0],
        lambda theta: learner.meta_kl(theta, pre_batches, post_batch),
        params, c.max_kl, c.cg_damping, c.cg_iterations, c.backtrack_ratio,
        c.max_backtracks, kl_hvp=learner.meta_kl_hvp(params, pre_batches, post_batch))
    return theta, opt_state, {
        "outer_loss": info["loss_before"], "outer_loss_after": info["loss_after"],
        "kl": info["kl_after"], "step_accepted": info["accepted"],
        "backtracks": info["backtracks"], "step_size": info["step_size"]}


VPG = OuterStep("adam", vpg_init, vpg_update)
TRPO = OuterStep("trpo", trpo_init, trpo_update)


@dataclasses.dataclass(frozen=True)
class MAMLParts:
    """One member of the family.

    inner: the inner loss L_in of φ_{k+1} = φ_k − α ∇L_in(φ_k).
    outer: the loss of φ_K on the post-update batch, averaged over tasks.
    outer_step: `TRPO` or `VPG`.
    exploration: None, or a per-task term added to the outer loss,
      `(policy, θ, step-0 batch, R̃'_i) -> scalar` (`emaml_exploration_term`).
    advantages: `(batch, config) -> batch` with `advantages` filled, for every phase.
    """

    inner: Objective
    outer: Objective
    outer_step: OuterStep
    exploration: Callable | None = None
    advantages: Callable = standard_advantages


class MAMLFamily(MetaLearner):
    """A MAML-family member: subclasses set `name`, `config_class` and `parts`."""

    name: str
    config_class: type
    parts: MAMLParts

    def __init__(self, config, env: TaskEnv, policy: GaussianPolicy):
        super().__init__(config, env, policy)
        # The VPG variants average over steps and have no KL constraint.
        self.averaging = getattr(config, "averaging", "steps")
        self.kl_direction = getattr(config, "kl_direction", "old_new")
        self.inner_loss = self.parts.inner.averaged(self.averaging)
        self.outer_loss = self.parts.outer.averaged(self.averaging)
        self.process = self.parts.advantages

    def init(self, key: jax.Array) -> MAMLState:
        init_key, key = jax.random.split(key)
        params = self.policy.init(init_key)
        opt_state = self.parts.outer_step.init(self.config, params)
        return MAMLState(params=params, opt_state=opt_state, key=key,
                         iteration=jnp.zeros((), jnp.int32))

    def adapt(self, theta, pre_batches: Trajectories) -> list:
        """φ_0 = θ, …, φ_K for ONE task, re-derived from θ on its stored batches [K]."""
        c = self.config
        adapted = [theta]
        for k in range(pre_batches.rewards.shape[0]):
            batch = jax.tree.map(lambda x: x[k], pre_batches)
            adapted.append(inner_update(self.inner_loss, self.policy, adapted[-1], batch,
                                        c.inner_lr, c.first_order))
        return adapted

    def meta_loss(self, theta, pre_batches: Trajectories, post_batch: Trajectories):
        """Outer loss averaged over tasks (pre_batches [M, K], post_batch [M]).

        Returns (loss, aux) with aux["exploration"] the E-MAML term (0 otherwise).
        """
        post_rewards = normalized_post_rewards(post_batch)  # [M]

        def task_loss(pre, post, post_reward):
            adapted = self.adapt(theta, pre)
            loss = self.outer_loss(self.policy, adapted[-1], post)
            first_batch = jax.tree.map(lambda x: x[0], pre)
            explore = self.parts.exploration
            exploration = (explore(self.policy, theta, first_batch, post_reward)
                           if explore is not None else jnp.zeros(()))
            return loss + exploration, exploration

        losses, exploration = jax.vmap(task_loss)(pre_batches, post_batch, post_rewards)
        return jnp.mean(losses), {"exploration": jnp.mean(exploration)}

    def meta_kl(self, theta, pre_batches: Trajectories, post_batch: Trajectories):
        """mean_i mean_{s'} KL(π_old'(·|s') ‖ π_{φ_K,i(θ)}(·|s')): TRPO's constraint between
        the post-update policies that sampled and those of the new θ. The KL's direction
        and its average over a task's states follow `kl_direction` and `averaging`."""

        def task_kl(pre, post):
            return kl_to_sampler(self.policy, self.adapt(theta, pre)[-1], post,
                                 self.kl_direction, self.averaging)

        return jnp.mean(jax.vmap(task_kl)(pre_batches, post_batch))

    def meta_kl_hvp(self, theta, pre_batches: Trajectories, post_batch: Trajectories):
        """The Hessian-vector product of `meta_kl` at the sampling θ, in Gauss–Newton form
        (exact there; see `gaussian_fisher_diagonal`), factored through the inner
        steps.

        Per task, φ_k = φ_{k−1} − α ∇L_in(φ_{k−1}; batch_k), so the Jacobian of the
        post-update distribution is J = J_post(φ_K) (I − α H_K) ⋯ (I − α H_1) with
        H_k = ∇²L_in(φ_{k−1}; batch_k). Each H_k is a Hessian, hence symmetric, and

            Jᵀ F J v = (I − α H_1) ⋯ (I − α H_K) J_postᵀ F J_post (I − α H_K) ⋯ (I − α H_1) v.

        Each inner step φ_{k−1} ↦ φ_k (`inner_update`) is linearised once and its
        Jacobian I − α H_k applied forwards on both sides; only the post-update
        distribution is transposed. Both KL directions have this Hessian at θ_old (F is
        the Fisher information of either); `averaging` sets the state weights of F.
        Transposing the whole linearised map
        instead costs a reverse pass through each inner gradient's tangent, which made
        the conjugate-gradient loop markedly slower (benchmarks/RESULTS.md). With `first_order`, the steps' Jacobians are I.
        """
        c = self.config
        num_tasks = post_batch.masks.shape[0]
        step = jax.vmap(inner_update, in_axes=(None, None, 0, 0, None, None))

        # Per-task parameters from the start, so tangents can differ between tasks.
        adapted = broadcast_to_tasks(theta, num_tasks)
        step_jacobians = []  # v ↦ (I − α H_k) v, per task
        for k in range(pre_batches.rewards.shape[1]):
            batch = jax.tree.map(lambda x: x[:, k], pre_batches)
            adapted, step_jacobian = jax.linearize(
                lambda params: step(self.inner_loss, self.policy, params, batch, c.inner_lr,
                                    c.first_order), adapted)
            step_jacobians.append(step_jacobian)

        def post_distributions(params):
            return jax.vmap(self.policy.distribution)(params, post_batch.observations)

        _, post_jvp = jax.linearize(post_distributions, adapted)
        post_vjp = jax.linear_transpose(post_jvp, adapted)
        mean_precision, log_std_precision = gaussian_fisher_diagonal(
            post_batch.log_stds, self.post_state_weights(post_batch))
        _, unravel = ravel_pytree(theta)

        def product(vector):
            tangents = broadcast_to_tasks(unravel(vector), num_tasks)
            for step_jacobian in step_jacobians:
                tangents = step_jacobian(tangents)
            d_mean, d_log_std = post_jvp(tangents)
            (pulled_back,) = post_vjp((mean_precision * d_mean, log_std_precision * d_log_std))
            for step_jacobian in reversed(step_jacobians):
                pulled_back = step_jacobian(pulled_back)
            return ravel_pytree(jax.tree.map(lambda x: jnp.sum(x, axis=0), pulled_back))[0]

        return product

    def post_state_weights(self, post_batch: Trajectories) -> jax.Array:
        """[M, N, H] weights that make Σ w_s the meta KL's average over each task's real
        post-update states (every step alike, or per episode with `averaging:
        episodes`), averaged over tasks."""
        masks = post_batch.masks
        weights = (episode_weights(masks, post_batch.dones) if self.averaging == "episodes"
                   else masks)
        total = jnp.sum(weights, axis=(1, 2), keepdims=True)
        return weights / jnp.where(total > 0, total, 1.0) / masks.shape[0]

    def adaptation_returns(self, params, key, num_tasks, adapt_steps, episodes_per_task):
        return adaptation_returns(self.env, self.policy, self.config, params, key, num_tasks,
                                  adapt_steps, episodes_per_task, self.inner_loss,
                                  self.process)

    def meta_iteration(self, state: MAMLState):
        c = self.config
        key, task_key, sample_key = jax.random.split(state.key, 3)
        tasks = self.env.sample_tasks(task_key, c.meta_batch_size)

        # 1. Sampling and inner adaptation with this variant's inner loss.
        pre_batches, post_batch = sample_adaptation_phases(
            self.env, self.policy, c, state.params, tasks, sample_key, self.inner_loss,
            self.process)

        # 2. The outer step, differentiating through the inner steps.
        metrics = phase_returns(pre_batches, post_batch)
        theta, opt_state, step_metrics = self.parts.outer_step.update(
            self, state.params, state.opt_state, pre_batches, post_batch)
        metrics.update(step_metrics)
        if self.parts.exploration is not None:
            metrics["exploration"] = self.meta_loss(state.params, pre_batches,
                                                    post_batch)[1]["exploration"]
        metrics["policy_std"] = jnp.mean(jnp.exp(self.policy.log_std(theta)))
        return MAMLState(params=theta, opt_state=opt_state, key=key,
                         iteration=state.iteration + 1), metrics


# --- the members: one class each -----------------------------------------------------------


class MAMLTRPO(MAMLFamily):
    """`--algo maml-trpo`: log-likelihood inner loss, TRPO on the outer surrogate."""

    name = "maml-trpo"
    config_class = MAMLTRPOConfig
    parts = MAMLParts(inner=LOG_LIKELIHOOD, outer=SURROGATE, outer_step=TRPO)


class MAMLVPG(MAMLFamily):
    """`--algo maml-vpg`: log-likelihood inner and outer losses, one Adam step."""

    name = "maml-vpg"
    config_class = MAMLVPGConfig
    parts = MAMLParts(inner=LOG_LIKELIHOOD, outer=LOG_LIKELIHOOD, outer_step=VPG)


class EMAMLTRPO(MAMLFamily):
    """`--algo emaml-trpo`: maml-trpo with E-MAML's exploration term."""

    name = "emaml-trpo"
    config_class = MAMLTRPOConfig
    parts = dataclasses.replace(MAMLTRPO.parts, exploration=emaml_exploration_term)


class EMAMLVPG(MAMLFamily):
    """`--algo emaml-vpg`: maml-vpg with E-MAML's exploration term."""

    name = "emaml-vpg"
    config_class = MAMLVPGConfig
    parts = dataclasses.replace(MAMLVPG.parts, exploration=emaml_exploration_term)


class LVCTRPO(MAMLFamily):
    """`--algo lvc-trpo`: ProMP's LVC inner loss, TRPO on the outer surrogate."""

    name = "lvc-trpo"
    config_class = MAMLTRPOConfig
    parts = MAMLParts(inner=LVC, outer=SURROGATE, outer_step=TRPO)


class LVCVPG(MAMLFamily):
    """`--algo lvc-vpg`: ProMP's LVC inner loss, log-likelihood outer loss, one Adam step."""

    name = "lvc-vpg"
    config_class = MAMLVPGConfig
    parts = MAMLParts(inner=LVC, outer=LOG_LIKELIHOOD, outer_step=VPG)


class DiCEVPG(MAMLFamily):
    """`--algo dice-vpg`: DiCE inner and outer losses on DiCE's adjusted rewards, one
    Adam step."""

    name = "dice-vpg"
    config_class = DiCEConfig
    parts = MAMLParts(inner=DICE, outer=DICE, outer_step=VPG, advantages=dice_advantages)


MAML_VARIANTS = [MAMLTRPO, MAMLVPG, EMAMLTRPO, EMAMLVPG, LVCTRPO, LVCVPG, DiCEVPG]
