"""Returns, the linear feature baseline, GAE and advantage normalisation.

All functions work on one task's phase batch, [N, H] (lanes × steps), and respect
`masks` (masked steps contribute nothing) and episode boundaries inside a lane (`dones`,
`timesteps`): nothing is discounted across the end of an episode. `process_phase`
applies them per task to a [M, N, H] batch.
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


def episode_discounted_sum(values: jax.Array, dones: jax.Array, factor: float) -> jax.Array:
    """Σ_{t' ≥ t, t' in the episode of t} factor^(t'−t) values_{t'}; [..., H] → [..., H].

    The sum over the whole lane, S = values @ Dᵀ (`discount_matrix`), overshoots into
    the episodes after t's; with e_t the first step of the next episode (H when there
    is none) the within-episode sum is S_t − factor^(e_t − t) · S_{e_t}. A lane without
    an episode end gets S exactly.
    """
    horizon = values.shape[-1]
    steps = jnp.arange(horizon)
    lane_sums = values @ discount_matrix(horizon, factor, values.dtype).T
    next_start = jax.lax.cummin(jnp.where(dones > 0, steps + 1, horizon), axis=values.ndim - 1,
                                reverse=True)
    padded = jnp.concatenate([lane_sums, jnp.zeros_like(lane_sums[..., :1])], axis=-1)
    beyond = jnp.take_along_axis(padded, next_start, axis=-1)
    decay = jnp.asarray(factor, values.dtype) ** (next_start - steps).astype(values.dtype)
    return lane_sums - decay * beyond


def discounted_returns(rewards: jax.Array, masks: jax.Array, discount: float,
                       dones: jax.Array | None = None) -> jax.Array:
    """Reward-to-go G_t = Σ_{t' ≥ t} γ^{t'-t} r_{t'} over the real steps of t's episode;
    [..., H] → [..., H].

    Masked steps contribute nothing and get G = 0; `dones` (1 where an episode ended)
    restarts the sum at episode boundaries inside a lane.
    """
    if dones is None:
        dones = jnp.zeros_like(masks)
    return masks * episode_discounted_sum(rewards * masks, dones, discount)


def baseline_features(observations: jax.Array, timesteps: jax.Array | None = None
                      ) -> jax.Array:
    """rllab's linear-baseline features, [..., H, obs] → [..., H, 2·obs + 4]:

        [clip(s, -10, 10), clip(s, -10, 10)², t/100, (t/100)², (t/100)³, 1]
    with t the step index within the episode (`timesteps` [..., H]; by default the
    index in the lane, for lanes holding one episode).
    """
    horizon = observations.shape[-2]
    clipped = jnp.clip(observations, -10.0, 10.0)
    if timesteps is None:
        timesteps = jnp.arange(horizon, dtype=observations.dtype)
    time = jnp.broadcast_to(jnp.asarray(timesteps, observations.dtype),
                            observations.shape[:-1])[..., None] / 100.0
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
                           discount: float, gae_lambda: float,
                           dones: jax.Array | None = None) -> jax.Array:
    """GAE (Schulman et al. 2016) within each episode, the value after its last step
    taken as 0 (whether it terminated or was cut at the end of the lane, as the
    reference sample processors value every path end):

        δ_t = r_t + γ V(s_{t+1}) m_{t+1} (1 − d_t) − V(s_t),
        Â_t = Σ_{l ≥ 0} (γλ)^l δ_{t+l} m_{t+l}   over the steps of t's episode.
    With λ = 1 this is G_t − V(s_t).
    """
    if dones is None:
        dones = jnp.zeros_like(masks)
    next_masks = jnp.concatenate([masks[..., 1:], jnp.zeros_like(masks[..., :1])], axis=-1)
    next_values = jnp.concatenate([values[..., 1:], jnp.zeros_like(values[..., :1])], axis=-1)
    deltas = (rewards + discount * next_values * next_masks * (1.0 - dones) - values) * masks
    return masks * episode_discounted_sum(deltas, dones, discount * gae_lambda)


def normalize(advantages: jax.Array, masks: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Zero mean, unit std over the real steps (population std, as numpy's default)."""
    count = jnp.maximum(jnp.sum(masks), 1.0)
    mean = jnp.sum(advantages * masks) / count
    std = jnp.sqrt(jnp.sum(masks * (advantages - mean) ** 2) / count)
    return masks * (advantages - mean) / (std + eps)


def task_advantages(batch: Trajectories, discount: float, gae_lambda: float,
                    normalize_advantages: bool = True) -> Trajectories:
    """Fills `returns` and `advantages` for ONE task's phase batch ([N, H])."""
    returns = discounted_returns(batch.rewards, batch.masks, discount, batch.dones)
    features = baseline_features(batch.observations, batch.timesteps)
    coeffs = fit_linear_baseline(features, returns, batch.masks)
    values = (features @ coeffs) * batch.masks
    advantages = generalized_advantages(batch.rewards, values, batch.masks, discount,
                                        gae_lambda, batch.dones)
    if normalize_advantages:
        advantages = normalize(advantages, batch.masks)
    return batch.replace(returns=returns, advantages=advantages)


def process_phase(batch: Trajectories, discount: float, gae_lambda: float,
                  normalize_advantages: bool = True) -> Trajectories:
    """Per-task baselines and advantages for a [M, N, H] phase batch."""
    return jax.vmap(task_advantages, in_axes=(0, None, None, None))(
        batch, discount, gae_lambda, normalize_advantages)


def task_dice_adjusted_rewards(batch: Trajectories, discount: float,
                               use_baseline: bool = True,
                               normalize_rewards: bool = True) -> Trajectories:
    """For ONE task's [N, H] batch: `advantages` ← the DiCE adjusted rewards
    γ^t r_t − b_t (t the step within the episode), b_t the linear feature baseline
    fitted to γ^t r_t (0 without baseline), normalised to zero mean and unit std over
    the task's real steps with `normalize_rewards` (the default of ProMP's
    `DiceSampleProcessor`); `returns` ← the discounted reward-to-go, for reference."""
    discounted = batch.rewards * discount ** batch.timesteps
    baseline = jnp.zeros_like(discounted)
    if use_baseline:
        features = baseline_features(batch.observations, batch.timesteps)
        coeffs = fit_linear_baseline(features, discounted, batch.masks)
        baseline = features @ coeffs
    adjusted = (discounted - baseline) * batch.masks
    if normalize_rewards:
        adjusted = normalize(adjusted, batch.masks)
    return batch.replace(
        returns=discounted_returns(batch.rewards, batch.masks, discount, batch.dones),
        advantages=adjusted)


def dice_adjusted_rewards(batch: Trajectories, discount: float, use_baseline: bool = True,
                          normalize_rewards: bool = True) -> Trajectories:
    """Per-task DiCE adjusted rewards for a [M, N, H] phase batch."""
    return jax.vmap(task_dice_adjusted_rewards, in_axes=(0, None, None, None))(
        batch, discount, use_baseline, normalize_rewards)
