"""Returns, the linear feature baseline, GAE and advantage normalisation (ALGORITHMS.md §0).

All functions work on one task's phase batch, [N, H] (episodes × steps), and respect
`masks`: steps after an episode ended contribute nothing. `process_phase` applies them
per task to a [M, N, H] batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metarl_jax.rollout import Trajectories


def discount_matrix(horizon: int, factor: float, dtype=jnp.float32) -> jax.Array:
    """Upper-triangular [H, H] matrix D[t, t'] = factor^(t' − t) for t' ≥ t, else 0.

    `x @ D.T` is the discounted reverse cumulative sum Σ_{t' ≥ t} factor^(t'−t) x_{t'}:
    one small matmul instead of a sequential scan over the horizon (H ≤ a few hundred).
    """
    steps = jnp.arange(horizon)
    lag = steps[None, :] - steps[:, None]
    return jnp.where(lag >= 0, jnp.asarray(factor, dtype) ** jnp.maximum(lag, 0), 0.0
                     ).astype(dtype)


def discounted_returns(rewards: jax.Array, masks: jax.Array, discount: float) -> jax.Array:
    """Reward-to-go G_t = Σ_{t' ≥ t} γ^{t'-t} r_{t'} over real steps; [..., H] → [..., H].

    Masked steps contribute nothing and get G = 0 (an ended episode's later steps are
    all masked, so no real step sees past the end).
    """
    weights = discount_matrix(rewards.shape[-1], discount, rewards.dtype)
    return masks * ((rewards * masks) @ weights.T)


def baseline_features(observations: jax.Array) -> jax.Array:
    """rllab's linear-baseline features, [..., H, obs] → [..., H, 2·obs + 4]:

        [clip(s, -10, 10), clip(s, -10, 10)², t/100, (t/100)², (t/100)³, 1]
    with t the step index within the episode.
    """
    horizon = observations.shape[-2]
    clipped = jnp.clip(observations, -10.0, 10.0)
    time = jnp.arange(horizon, dtype=observations.dtype)[:, None] / 100.0
    time = jnp.broadcast_to(time, observations.shape[:-1] + (1,))
    return jnp.concatenate([clipped, clipped ** 2, time, time ** 2, time ** 3,
                            jnp.ones_like(time)], axis=-1)


def fit_linear_baseline(features: jax.Array, targets: jax.Array, masks: jax.Array,
                        reg_coeff: float = 1e-5, max_escalations: int = 5) -> jax.Array:
    """Ridge least squares w = (XᵀX + c I)⁻¹ Xᵀ y over the real steps.

    As in rllab's LinearFeatureBaseline, when the solution is not finite the regulariser
    c is multiplied by 10 and the solve retried, at most `max_escalations` times.

    Args:
      features: [..., F], flattened over all leading axes.
      targets, masks: [...].
    Returns:
      coefficients, [F].
    """
    num_features = features.shape[-1]
    x = features.reshape(-1, num_features) * masks.reshape(-1, 1)
    y = (targets * masks).reshape(-1)
    gram, moment = x.T @ x, x.T @ y
    identity = jnp.eye(num_features, dtype=x.dtype)

    def solve(reg):
        return jnp.linalg.solve(gram + reg * identity, moment)

    def needs_retry(carry):
        coeffs, reg, tries = carry
        return jnp.logical_and(~jnp.all(jnp.isfinite(coeffs)), tries < max_escalations)

    def retry(carry):
        _, reg, tries = carry
        reg = reg * 10.0
        return solve(reg), reg, tries + 1

    reg0 = jnp.asarray(reg_coeff, x.dtype)
    coeffs, _, _ = jax.lax.while_loop(needs_retry, retry, (solve(reg0), reg0, 0))
    return coeffs


def generalized_advantages(rewards: jax.Array, values: jax.Array, masks: jax.Array,
                           discount: float, gae_lambda: float) -> jax.Array:
    """GAE (Schulman et al. 2016), the value after the last real step taken as 0:

        δ_t = r_t + γ V(s_{t+1}) m_{t+1} − V(s_t),   Â_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l} m_{t+l}.
    With λ = 1 this is G_t − V(s_t).
    """
    next_masks = jnp.concatenate([masks[..., 1:], jnp.zeros_like(masks[..., :1])], axis=-1)
    next_values = jnp.concatenate([values[..., 1:], jnp.zeros_like(values[..., :1])], axis=-1)
    deltas = (rewards + discount * next_values * next_masks - values) * masks
    weights = discount_matrix(rewards.shape[-1], discount * gae_lambda, rewards.dtype)
    return masks * (deltas @ weights.T)


def normalize(advantages: jax.Array, masks: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Zero mean, unit std over the real steps (population std, as numpy's default)."""
    count = jnp.maximum(jnp.sum(masks), 1.0)
    mean = jnp.sum(advantages * masks) / count
    std = jnp.sqrt(jnp.sum(masks * (advantages - mean) ** 2) / count)
    return masks * (advantages - mean) / (std + eps)


def task_advantages(batch: Trajectories, discount: float, gae_lambda: float,
                    normalize_advantages: bool = True) -> Trajectories:
    """Fills `returns` and `advantages` for ONE task's phase batch ([N, H])."""
    returns = discounted_returns(batch.rewards, batch.masks, discount)
    features = baseline_features(batch.observations)
    coeffs = fit_linear_baseline(features, returns, batch.masks)
    values = (features @ coeffs) * batch.masks
    advantages = generalized_advantages(batch.rewards, values, batch.masks, discount,
                                        gae_lambda)
    if normalize_advantages:
        advantages = normalize(advantages, batch.masks)
    return batch.replace(returns=returns, advantages=advantages)


def process_phase(batch: Trajectories, discount: float, gae_lambda: float,
                  normalize_advantages: bool = True) -> Trajectories:
    """Per-task baselines and advantages for a [M, N, H] phase batch."""
    return jax.vmap(task_advantages, in_axes=(0, None, None, None))(
        batch, discount, gae_lambda, normalize_advantages)


def task_dice_adjusted_rewards(batch: Trajectories, discount: float,
                               use_baseline: bool = True) -> Trajectories:
    """For ONE task's [N, H] batch: `advantages` ← γ^t r_t − b_t, the DiCE adjusted
    rewards, b_t the linear feature baseline fitted to γ^t r_t (0 without baseline);
    `returns` ← the discounted reward-to-go, for reference."""
    horizon = batch.rewards.shape[-1]
    discounted = batch.rewards * discount ** jnp.arange(horizon, dtype=batch.rewards.dtype)
    baseline = jnp.zeros_like(discounted)
    if use_baseline:
        features = baseline_features(batch.observations)
        coeffs = fit_linear_baseline(features, discounted, batch.masks)
        baseline = features @ coeffs
    return batch.replace(returns=discounted_returns(batch.rewards, batch.masks, discount),
                         advantages=(discounted - baseline) * batch.masks)


def dice_adjusted_rewards(batch: Trajectories, discount: float,
                          use_baseline: bool = True) -> Trajectories:
    """Per-task DiCE adjusted rewards for a [M, N, H] phase batch."""
    return jax.vmap(task_dice_adjusted_rewards, in_axes=(0, None, None))(
        batch, discount, use_baseline)
