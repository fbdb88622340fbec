"""Pure objectives of the meta-learners: functions of (params, batch, hyperparameters).

Each takes the (hashable) policy first, so `jax.jit(functools.partial(loss, policy))`
gives a standalone compiled loss, and a batch of `Trajectories` for ONE task ([N, H]
leading axes; vmap over tasks). Averages run over the real (unmasked) steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metarl_jax.policies import GaussianPolicy, gaussian_kl, gaussian_log_prob
from metarl_jax.rollout import Trajectories


def masked_mean(values: jax.Array, masks: jax.Array) -> jax.Array:
    """Σ values · masks / max(Σ masks, 1): the mean over the real (mask 1) entries, 0 when
    there are none."""
    return jnp.sum(values * masks) / jnp.maximum(jnp.sum(masks), 1.0)


def likelihood_ratio(policy: GaussianPolicy, params, batch: Trajectories) -> jax.Array:
    """r = exp(log π_params(a|s) − logp_old(a|s)), with `logp_old` the stored constant."""
    log_probs = policy.log_prob(params, batch.observations, batch.actions)
    return jnp.exp(log_probs - batch.log_probs)


def likelihood_ratio_loss(policy: GaussianPolicy, params, batch: Trajectories) -> jax.Array:
    """The likelihood-ratio objective, negated:

        L(φ) = − mean_{(s,a)} [ exp(log π_φ(a|s) − logp_old(a|s)) · Â ]

    As an inner loss it is ProMP's low-variance-curvature (LVC) loss; on post-update
    samples it is the MAML-TRPO surrogate −mean(r' Â').

    `logp_old` is the stored log-likelihood of the sampling policy, not
    sg(log π_φ): at φ = sampling policy the ratio is 1 and the gradient is the plain
    policy gradient, yet the Hessian through the ratio keeps the H1 + H2 terms.
    """
    return _ratio_loss(policy.log_prob(params, batch.observations, batch.actions), batch)


def _ratio_loss(log_probs: jax.Array, batch: Trajectories) -> jax.Array:
    return -masked_mean(jnp.exp(log_probs - batch.log_probs) * batch.advantages, batch.masks)


def _kl_to_sampler(mean: jax.Array, log_std: jax.Array, batch: Trajectories) -> jax.Array:
    return masked_mean(gaussian_kl(batch.means, batch.log_stds, mean, log_std), batch.masks)


lvc_inner_loss = likelihood_ratio_loss


def lvc_inner_loss_with_kl(policy: GaussianPolicy, params,
                           batch: Trajectories) -> tuple[jax.Array, jax.Array]:
    """(`lvc_inner_loss`, `mean_kl_from_sampler`) on one batch from one forward pass.

    ProMP needs both at every φ_k; computed separately, XLA kept two forward passes over
    the pre-update batch.
    """
    mean, log_std = policy.distribution(params, batch.observations)
    return (_ratio_loss(gaussian_log_prob(mean, log_std, batch.actions), batch),
            _kl_to_sampler(mean, log_std, batch))


def log_likelihood_loss(policy: GaussianPolicy, params, batch: Trajectories) -> jax.Array:
    """MAML's policy-gradient ("log-likelihood") loss:

        L(φ) = − mean_{(s,a)} log π_φ(a|s) · Â

    Its gradient is the vanilla policy gradient; differentiating through a step on it
    keeps only the H2 term (Σ ∇² log π · Â) of the inner Hessian.
    """
    log_probs = policy.log_prob(params, batch.observations, batch.actions)
    return -masked_mean(log_probs * batch.advantages, batch.masks)


def magic_box(x: jax.Array) -> jax.Array:
    """DiCE's MagicBox, MB(x) = exp(x − sg(x)): 1 in value, ∇MB(x) = MB(x) ∇x."""
    return jnp.exp(x - jax.lax.stop_gradient(x))


def dice_loss(policy: GaussianPolicy, params, batch: Trajectories) -> jax.Array:
    """DiCE (Foerster et al. 2018) objective, negated:

        L(φ) = − mean_{(n,t)} MB(τ_{n,t}) · (γ^t r_{n,t} − b_{n,t}),
        τ_{n,t} = Σ_{t' ≤ t, t' in the episode of t} log π_φ(a_{n,t'} | s_{n,t'})

    with `batch.advantages` holding the adjusted rewards γ^t r_t − b_t
    (`metarl_jax.advantages.dice_adjusted_rewards`). Any order of derivative of its
    expectation is the derivative of the expected return. τ restarts with every
    episode of a lane (its first step is `timesteps` steps back).
    """
    log_probs = policy.log_prob(params, batch.observations, batch.actions) * batch.masks
    cumulative = jnp.cumsum(log_probs, axis=-1)
    # Minus the lane's cumulative sum before the episode's first step.
    episode_start = (jnp.arange(log_probs.shape[-1]) - batch.timesteps).astype(jnp.int32)
    before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative], axis=-1)
    cumulative = cumulative - jnp.take_along_axis(before, episode_start, axis=-1)
    return -masked_mean(magic_box(cumulative) * batch.advantages, batch.masks)


def clipped_surrogate(ratio: jax.Array, advantages: jax.Array, masks: jax.Array,
                      clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate (Schulman et al. 2017), to be *maximised*:

        mean_{real steps} min(r Â, clip(r, 1 − ε, 1 + ε) Â),

    with `ratio` r = π(a|s) / π_old(a|s) and `masks` marking the real steps. Returns
    (objective, clip fraction: the share of real steps with |r − 1| > ε).
    """
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = masked_mean(jnp.minimum(unclipped, clipped), masks)
    clip_fraction = masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(ratio.dtype), masks)
    return objective, clip_fraction


def promp_clipped_objective(policy: GaussianPolicy, params, batch: Trajectories,
                            clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """`clipped_surrogate` on post-update samples (ProMP's outer objective, to be
    *maximised*):

        mean_{(s',a')} min(r Â', clip(r, 1 − ε, 1 + ε) Â'),
        r = exp(log π_φK(a'|s') − logp_old'(a'|s')).

    Returns (objective, clip fraction).
    """
    return clipped_surrogate(likelihood_ratio(policy, params, batch), batch.advantages,
                             batch.masks, clip_eps)


def mean_kl_from_sampler(policy: GaussianPolicy, params, batch: Trajectories) -> jax.Array:
    """mean over the batch's states of KL(π_old(·|s) ‖ π_params(·|s)), closed form.

    π_old is the stored sampling distribution (`means`, `log_stds`), a constant.
    """
    mean, log_std = policy.distribution(params, batch.observations)
    return _kl_to_sampler(mean, log_std, batch)


def inner_update(inner_loss, policy: GaussianPolicy, params, batch: Trajectories,
                 inner_lr, first_order: bool = False, has_aux: bool = False):
    """One gradient step φ' = φ − α ⊙ ∇_φ L_in(φ; batch), differentiable in φ (and α).

    `inner_lr` is a scalar α or a pytree shaped like `params` (per-parameter step sizes,
    as GMPS learns them). With `first_order`, the inner gradient is a constant
    (first-order MAML): dφ'/dφ = I. With `has_aux`, `inner_loss` returns (loss, aux) and
    this returns (φ', aux), aux still differentiable in φ.
    """
    grads = jax.grad(inner_loss, argnums=1, has_aux=has_aux)(policy, params, batch)
    grads, aux = grads if has_aux else (grads, None)
    if first_order:
        grads = jax.lax.stop_gradient(grads)
    if jax.tree.structure(inner_lr) == jax.tree.structure(params):
        updated = jax.tree.map(lambda p, a, g: p - a * g, params, inner_lr, grads)
    else:
        updated = jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)
    return (updated, aux) if has_aux else updated


def importance_weighted_pg_loss(policy: GaussianPolicy, params, batch: Trajectories) -> jax.Array:
    """GMPS's inner loss (Mendonca et al. 2019):

        L_in(θ) = − mean_{(s,a)} log π_θ(a|s) · sg(π_θ(a|s) / π_θinit(a|s)) · Â

    π_θinit is the sampling policy (its stored `log_probs`): at θ = θ_init the weight is
    1 and the gradient is the plain policy gradient; as θ moves during the many outer
    steps on the same batch, the weights keep the gradient an estimate for π_θ.
    """
    log_probs = policy.log_prob(params, batch.observations, batch.actions)
    weights = jax.lax.stop_gradient(jnp.exp(log_probs - batch.log_probs))
    return -masked_mean(log_probs * weights * batch.advantages, batch.masks)


def imitation_loss(policy: GaussianPolicy, params, observations: jax.Array,
                   expert_actions: jax.Array, weights: jax.Array, kind: str = "mse",
                   std_penalty: float = 0.0):
    """GMPS's outer (imitation) loss on expert data:

        mse: mean_{(s,a*)} ‖μ_θ'(s) − a*‖² + c · ‖σ_θ'(s)‖²   (the reference code's)
        nll: − mean_{(s,a*)} log π_θ'(a*|s)                   (the paper's)

    c is `std_penalty`, the reference's `l2loss_std_mult` (its loss class defaults to 1,
    its released launcher passes 0); it only enters the MSE, which otherwise never asks
    for a narrower σ. `weights` [D] masks padded entries (1 for real demonstrations).
    """
    mean, log_std = policy.distribution(params, observations)
    if kind == "mse":
        per_sample = jnp.sum((mean - expert_actions) ** 2
                             + std_penalty * jnp.exp(2.0 * log_std), axis=-1)
    else:
        per_sample = -gaussian_log_prob(mean, log_std, expert_actions)
    return masked_mean(per_sample, weights)


def promp_outer_loss(policy: GaussianPolicy, theta, pre_batches: Trajectories,
                     post_batch: Trajectories, kl_coeffs: jax.Array, inner_lr: float,
                     clip_eps: float):
    """ProMP's outer loss for ONE task, minimised over θ:

        − mean( min(r Â', clip(r, 1−ε, 1+ε) Â') ) + mean_k c_k · KL_k(θ)
        KL_k = mean_s KL(π_old_k(·|s) ‖ π_{φ_k(θ)}(·|s)),   φ_0 = θ,
        φ_{k+1}(θ) = φ_k(θ) − α ∇ L_in(φ_k(θ); batch_k)      (LVC inner loss)

    The adapted parameters are re-derived from θ on the stored pre-update batches, so
    the gradient flows through the inner steps (second order). The meta-batch average
    of this loss is the full ProMP objective because both terms are linear in the
    per-task quantities.

    Args:
      pre_batches: the K inner-phase batches of this task, leading axis K.
      post_batch: the post-update batch, sampled with φ_K.
      kl_coeffs: [K] penalty coefficients c_k.
    Returns:
      (loss, aux) with aux = {"surrogate", "kls" [K], "clip_fraction"}.
    """

    def adapt(params, batch):  # (φ_{k+1}, KL_k)
        return inner_update(lvc_inner_loss_with_kl, policy, params, batch, inner_lr,
                            has_aux=True)

    adapted, kls = jax.lax.scan(adapt, theta, pre_batches)
    surrogate, clip_fraction = promp_clipped_objective(policy, adapted, post_batch, clip_eps)
    loss = -surrogate + jnp.mean(kl_coeffs * kls)
    return loss, {"surrogate": surrogate, "kls": kls, "clip_fraction": clip_fraction}


# --- per-episode averages, the KL in either direction (options of the TRPO variants) ----
#
# The losses above average over every real step of a task's batch, as ProMP's code does.
# pytorch-maml-rl averages each episode over its own length first, then over the
# episodes (its `weighted_mean`), in the inner loss, the outer surrogate and the KL: a
# short episode (a goal reached early) weighs as much as a long one.


def episode_weights(masks: jax.Array, dones: jax.Array) -> jax.Array:
    """Step weights [..., H] for a per-episode average: w_t = m_t / L(t), L(t) the number
    of real steps of t's episode.

    An episode ends with a step where `dones` is 1 (the next step of the lane, if real,
    starts the next one) or with the lane's last step (cut there). Σ_t w_t v_t is then
    the sum over episodes of each episode's mean of v, and Σ_t w_t the episode count.
    """
    horizon = masks.shape[-1]
    axis = masks.ndim - 1
    steps = jnp.arange(horizon)
    ended_before = jnp.concatenate([jnp.zeros_like(dones[..., :1]), dones[..., :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(ended_before > 0, steps, 0), axis=axis)
    last = jax.lax.cummin(jnp.where(dones > 0, steps, horizon - 1), axis=axis, reverse=True)
    real_up_to = jnp.cumsum(masks, axis=-1)  # real steps in [0, t]
    real_before = jnp.concatenate([jnp.zeros_like(masks[..., :1]), real_up_to], axis=-1)
    lengths = (jnp.take_along_axis(real_up_to, last, axis=-1)
               - jnp.take_along_axis(real_before, first, axis=-1))
    return masks / jnp.maximum(lengths, 1.0)


def episode_mean(values: jax.Array, masks: jax.Array, dones: jax.Array) -> jax.Array:
    """Mean over the batch's episodes of each episode's mean of `values` over its real
    steps (`episode_weights`)."""
    weights = episode_weights(masks, dones)
    episodes = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.where(episodes > 0, episodes, 1.0)


def log_likelihood_loss_per_episode(policy: GaussianPolicy, params,
                                    batch: Trajectories) -> jax.Array:
    """`log_likelihood_loss` averaged per episode (`episode_mean`):

        L(φ) = − mean_episodes [ mean_{t in the episode} log π_φ(a_t|s_t) · Â_t ]
    """
    log_probs = policy.log_prob(params, batch.observations, batch.actions)
    return -episode_mean(log_probs * batch.advantages, batch.masks, batch.dones)


def likelihood_ratio_loss_per_episode(policy: GaussianPolicy, params,
                                      batch: Trajectories) -> jax.Array:
    """`likelihood_ratio_loss` averaged per episode (`episode_mean`):

        L(φ) = − mean_episodes [ mean_{t in the episode} r_t · Â_t ],
        r_t = exp(log π_φ(a_t|s_t) − logp_old(a_t|s_t))
    """
    ratio = likelihood_ratio(policy, params, batch)
    return -episode_mean(ratio * batch.advantages, batch.masks, batch.dones)


KL_DIRECTIONS = ("old_new", "new_old")
AVERAGES = ("steps", "episodes")


def kl_to_sampler(policy: GaussianPolicy, params, batch: Trajectories,
                  direction: str = "old_new", average: str = "steps") -> jax.Array:
    """The mean KL between the sampling policy π_old (the batch's stored `means`,
    `log_stds`) and π_params over the batch's states, closed form:

        direction "old_new": KL(π_old(·|s) ‖ π_params(·|s))   (ProMP's code; as
                             `mean_kl_from_sampler`)
        direction "new_old": KL(π_params(·|s) ‖ π_old(·|s))   (pytorch-maml-rl's)

    averaged over every real step (`average` "steps") or per episode ("episodes",
    `episode_mean`). Both directions vanish at π_params = π_old with the same Hessian
    there (the Fisher information), so they differ only away from it.
    """
    if direction not in KL_DIRECTIONS or average not in AVERAGES:
        raise ValueError(f"kl_to_sampler: direction {direction!r}, average {average!r}")
    mean, log_std = policy.distribution(params, batch.observations)
    if direction == "old_new":
        kl = gaussian_kl(batch.means, batch.log_stds, mean, log_std)
    else:
        kl = gaussian_kl(mean, log_std, batch.means, batch.log_stds)
    if average == "steps":
        return masked_mean(kl, batch.masks)
    return episode_mean(kl, batch.masks, batch.dones)
