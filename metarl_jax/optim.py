"""In-graph second-order optimisation: conjugate gradient and the TRPO step.

Everything here is traceable: loops are `lax` loops, so a TRPO update runs inside the
compiled meta-iteration with no host round-trip.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array,
                       iterations: int = 10, residual_tol: float = 1e-10,
                       return_residual: bool = False):
    """Approximately solves A x = b for symmetric positive-definite A, given x ↦ A x.

    The classic CG recursion (Hestenes–Stiefel) from x₀ = 0, run for `iterations` steps
    or until the squared residual falls below `residual_tol` (the remaining steps then
    leave x unchanged), as in rllab/ProMP's `cg`. With `return_residual`, returns
    (x, r) with r = b − A x as the recursion carries it, so that xᵀ A x = xᵀ (b − r)
    costs no further product with A.
    """

    def body(_, carry):
        x, r, p, rr = carry
        active = rr >= residual_tol
        z = matvec(p)
        alpha = rr / jnp.maximum(jnp.dot(p, z), jnp.finfo(b.dtype).tiny)
        x_new = x + alpha * p
        r_new = r - alpha * z
        rr_new = jnp.dot(r_new, r_new)
        p_new = r_new + (rr_new / rr) * p
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        return keep(x_new, x), keep(r_new, r), keep(p_new, p), keep(rr_new, rr)

    zeros = jnp.zeros_like(b)
    x, r, _, _ = jax.lax.fori_loop(0, iterations, body, (zeros, b, b, jnp.dot(b, b)))
    return (x, r) if return_residual else x


def hessian_vector_product(fn: Callable, params) -> Callable[[jax.Array], jax.Array]:
    """v ↦ ∇²fn(params) v on flat vectors, exact (forward-over-reverse autodiff)."""
    flat, unravel = ravel_pytree(params)

    def flat_grad(x):
        return ravel_pytree(jax.grad(fn)(unravel(x)))[0]

    return lambda v: jax.jvp(flat_grad, (flat,), (v,))[1]


def gaussian_fisher_diagonal(old_log_stds: jax.Array, weights: jax.Array):
    """The Fisher information of a diagonal Gaussian in (μ, log σ), times state weights:
    (w_s / σ², 2 w_s) per state s and action dimension, each shaped like `old_log_stds`.
    It is the Hessian of KL(π_old ‖ π) in (μ, log σ) at π = π_old.

    There the KL's gradient with respect to (μ, log σ) vanishes, so the KL's Hessian with
    respect to the policy parameters θ is exactly Jᵀ F J, J the Jacobian of θ ↦ (μ, log σ)
    over the states and F this diagonal: products with it need one linearisation of that
    map, not a third-order derivative when the map itself contains an inner gradient step
    (MAML-TRPO's `MAMLFamily.meta_kl_hvp`)."""
    return weights[..., None] * jnp.exp(-2.0 * old_log_stds), 2.0 * weights[..., None]


def trpo_step(loss_fn: Callable, kl_fn: Callable, params, max_kl: float = 0.01,
              damping: float = 1e-5, cg_iterations: int = 10, backtrack_ratio: float = 0.8,
              max_backtracks: int = 15, kl_hvp: Callable | None = None):
    """One TRPO update (Schulman et al. 2015), as rllab's ConjugateGradientOptimizer.

    Minimises `loss_fn` subject to `kl_fn(params') ≤ max_kl`:
      s = (H + damping·I)⁻¹ g by conjugate gradient, H the exact Hessian of `kl_fn` at
      `params`, g = ∇loss; initial step β s with β = sqrt(2 δ / (sᵀ (H + damping·I) s)),
      the curvature sᵀ (H + damping·I) s = sᵀ (g − r) from CG's final residual r;
      backtracking line search over β·ratio^j, j = 0..max_backtracks-1, accepting the
      first step that lowers the loss and keeps the KL ≤ δ; otherwise params unchanged.
      `kl_hvp` may supply the KL's Hessian-vector product at `params` (for instance
      `MAMLFamily.meta_kl_hvp`); by default it is autodiff of `kl_fn`.

    Returns:
      (new_params, info) with info = {"accepted", "backtracks", "loss_before",
      "loss_after", "kl_after", "step_size"}.
    """
    flat, unravel = ravel_pytree(params)
    loss_before, grads = jax.value_and_grad(loss_fn)(params)
    gradient = ravel_pytree(grads)[0]
    if kl_hvp is None:
        kl_hvp = hessian_vector_product(kl_fn, params)

    def damped_hvp(v):
        return kl_hvp(v) + damping * v

    direction, residual = conjugate_gradient(damped_hvp, gradient, cg_iterations,
                                             return_residual=True)
    # sᵀ(H + λI)s from CG's residual, sᵀ(g − r), where rllab spends one more
    # Hessian-vector product on it (1 of 11 per TRPO step at the defaults).
    curvature = jnp.dot(direction, gradient - residual)
    step_size = jnp.sqrt(2.0 * max_kl / (curvature + 1e-8))
    full_step = step_size * direction

    def evaluate(j):
        candidate = unravel(flat - backtrack_ratio ** j * full_step)
        return loss_fn(candidate), kl_fn(candidate)

    def acceptable(loss, kl):
        # NaN compares False, so a non-finite candidate is never accepted.
        return jnp.logical_and(loss < loss_before, kl <= max_kl)

    def not_accepted(carry):
        j, loss, kl = carry
        return jnp.logical_and(j < max_backtracks - 1, ~acceptable(loss, kl))

    def next_candidate(carry):
        j = carry[0] + 1
        loss, kl = evaluate(j)
        return j, loss, kl

    loss0, kl0 = evaluate(0)
    j, loss_after, kl_after = jax.lax.while_loop(not_accepted, next_candidate,
                                                 (jnp.asarray(0), loss0, kl0))
    accepted = acceptable(loss_after, kl_after)
    new_flat = jnp.where(accepted, flat - backtrack_ratio ** j * full_step, flat)
    info = {"accepted": accepted.astype(jnp.float32), "backtracks": j.astype(jnp.float32),
            "loss_before": loss_before,
            "loss_after": jnp.where(accepted, loss_after, loss_before),
            "kl_after": jnp.where(accepted, kl_after, 0.0), "step_size": step_size}
    return unravel(new_flat), info
