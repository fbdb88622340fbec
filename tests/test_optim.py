"""In-graph conjugate gradient and TRPO step against dense linear algebra."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from metarl_jax.optim import conjugate_gradient, hessian_vector_product, trpo_step
from metarl_jax.policies import GaussianPolicy, gaussian_kl


def small_problem():
    policy = GaussianPolicy(3, 2, (5,))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), policy.init(jax.random.PRNGKey(0)))
    obs = jax.random.normal(jax.random.PRNGKey(1), (64, 3), jnp.float64)
    old_mean, old_log_std = policy.distribution(params, obs)

    def mean_kl(new_params):
        mean, log_std = policy.distribution(new_params, obs)
        return jnp.mean(gaussian_kl(old_mean, old_log_std, mean, log_std))

    return policy, params, obs, mean_kl


def test_conjugate_gradient_matches_dense_solve_of_damped_fisher():
    with jax.enable_x64(True):
        _, params, _, mean_kl = small_problem()
        flat, unravel = ravel_pytree(params)
        damping = 1e-3
        fisher = jax.hessian(lambda x: mean_kl(unravel(x)))(flat)
        dense = np.asarray(fisher) + damping * np.eye(flat.size)
        b = jax.random.normal(jax.random.PRNGKey(2), flat.shape, jnp.float64)
        expected = np.linalg.solve(dense, np.asarray(b))

        hvp = hessian_vector_product(mean_kl, params)
        np.testing.assert_allclose(np.asarray(hvp(b)), np.asarray(fisher) @ np.asarray(b),
                                   rtol=1e-10, atol=1e-12)
        solution = conjugate_gradient(lambda v: hvp(v) + damping * v, b,
                                      iterations=4 * flat.size, residual_tol=1e-24)
        np.testing.assert_allclose(np.asarray(solution), expected, rtol=1e-6, atol=1e-6)
        # With the reference 10 iterations: the same iterate as the textbook recursion
        # in numpy, and a lower CG objective ½xᵀAx − bᵀx than 5 iterations reach.
        ten = np.asarray(conjugate_gradient(lambda v: hvp(v) + damping * v, b, iterations=10))
        x, r = np.zeros(flat.size), np.asarray(b).copy()
        p, rr = r.copy(), r @ r
        for _ in range(10):
            z = dense @ p
            alpha = rr / (p @ z)
            x, r = x + alpha * p, r - alpha * z
            p, rr = r + (r @ r) / rr * p, r @ r
        np.testing.assert_allclose(ten, x, rtol=1e-8, atol=1e-10)
        # TRPO's curvature xᵀAx from the carried residual equals the direct product.
        ten, residual = conjugate_gradient(lambda v: hvp(v) + damping * v, b, iterations=10,
                                           return_residual=True)
        np.testing.assert_allclose(np.asarray(ten) @ (np.asarray(b) - np.asarray(residual)),
                                   x @ dense @ x, rtol=1e-10)
        five = np.asarray(conjugate_gradient(lambda v: hvp(v) + damping * v, b, iterations=5))

        def objective(v):
            return 0.5 * v @ dense @ v - np.asarray(b) @ v

        assert objective(ten) < objective(five) < 0.0


def test_trpo_step_improves_within_kl_bound():
    with jax.enable_x64(True):
        policy, params, obs, mean_kl = small_problem()
        actions = jax.random.normal(jax.random.PRNGKey(3), (64, 2), jnp.float64)
        advantages = jax.random.normal(jax.random.PRNGKey(4), (64,), jnp.float64)
        old_log_probs = policy.log_prob(params, obs, actions)

        def surrogate_loss(new_params):
            ratio = jnp.exp(policy.log_prob(new_params, obs, actions) - old_log_probs)
            return -jnp.mean(ratio * advantages)

        new_params, info = trpo_step(surrogate_loss, mean_kl, params, max_kl=0.01)
        assert float(info["accepted"]) == 1.0
        assert float(mean_kl(new_params)) <= 0.01
        assert float(mean_kl(new_params)) > 0.001  # a real step, near the trust region
        assert float(surrogate_loss(new_params)) < float(surrogate_loss(params))
        np.testing.assert_allclose(float(info["kl_after"]), float(mean_kl(new_params)))


def test_trpo_step_rejected_leaves_params_unchanged():
    with jax.enable_x64(True):
        _, params, _, mean_kl = small_problem()
        flat, unravel = ravel_pytree(params)
        direction = jax.random.normal(jax.random.PRNGKey(5), flat.shape, jnp.float64)

        def misleading_loss(new_params):
            # Decreases to first order along `direction` but a huge curvature makes every
            # step of the line search worse than standing still.
            delta = ravel_pytree(new_params)[0] - flat
            return -jnp.dot(direction, delta) + 1e6 * jnp.dot(delta, delta)

        new_params, info = trpo_step(misleading_loss, mean_kl, params, max_kl=0.01,
                                     max_backtracks=15)
        assert float(info["accepted"]) == 0.0
        assert float(info["backtracks"]) == 14.0  # every candidate was tried
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
