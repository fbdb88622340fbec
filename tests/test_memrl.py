"""MEMRL: the proximal inner steps and the Moreau meta-gradient on a problem with a known
proximal point, first order only, and the compiled meta-iteration."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax import run_config
from metarl_jax.algorithms.memrl import moreau_meta_gradient, proximal_loss
from metarl_jax.losses import inner_update
from metarl_jax.policies import ACTIVATIONS

TINY = {"meta_batch_size": 3, "episodes_per_task": 3, "horizon": 12, "hidden_sizes": [8, 8],
        "inner_steps": 2}


def build(algo="memrl", **overrides):
    config = run_config.resolve_config({**run_config.DEFAULT_EXPERIMENT, **TINY, "algo": algo,
                                     **overrides})
    return run_config.build(config)[2]


def test_inner_steps_reach_the_proximal_point_and_meta_gradient_is_the_envelope_gradient():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        root = rng.normal(size=(4, 4))
        curvature = jnp.asarray(root @ root.T / 4 + 0.5 * np.eye(4))  # J concave
        optimum = jnp.asarray(rng.normal(size=4))
        theta = {"w": jnp.asarray(rng.normal(size=4))}
        lam, alpha = 2.0, 0.1

        def negative_return(policy, params, batch):  # f = −J, J(φ) = −½(φ−c)ᵀA(φ−c)
            delta = params["w"] - optimum
            return 0.5 * delta @ curvature @ delta

        loss = functools.partial(proximal_loss, anchor=theta, proximal_lambda=lam,
                                 base_loss=negative_return)
        phi = theta
        for _ in range(400):
            phi = inner_update(loss, None, phi, None, alpha)
        proximal_point = jnp.linalg.solve(curvature + lam * jnp.eye(4),
                                          curvature @ optimum + lam * theta["w"])
        np.testing.assert_allclose(np.asarray(phi["w"]), np.asarray(proximal_point),
                                   rtol=1e-10, atol=1e-12)

        def moreau_envelope(anchor):  # F(θ) = min_φ f(φ) + λ/2 ‖φ − θ‖², closed form
            point = jnp.linalg.solve(curvature + lam * jnp.eye(4),
                                     curvature @ optimum + lam * anchor)
            delta = point - optimum
            return 0.5 * delta @ curvature @ delta + 0.5 * lam * jnp.sum((point - anchor) ** 2)

        meta_gradient = moreau_meta_gradient(theta, jax.tree.map(lambda x: x[None], phi), lam)
        np.testing.assert_allclose(np.asarray(meta_gradient["w"]),
                                   np.asarray(jax.grad(moreau_envelope)(theta["w"])),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(meta_gradient["w"]),
                                   np.asarray(lam * (theta["w"] - proximal_point)), rtol=1e-9)
        # One step is the documented update φ + α(ĝ − λ(φ − θ)).
        phi0 = {"w": theta["w"] + 0.3}
        one = inner_update(loss, None, phi0, None, alpha)
        g = -curvature @ (phi0["w"] - optimum)
        np.testing.assert_allclose(np.asarray(one["w"]), np.asarray(
            phi0["w"] + alpha * (g - lam * (phi0["w"] - theta["w"]))), rtol=1e-12)


def _once_differentiable_tanh():
    @jax.custom_jvp
    def no_second_derivative(x):
        return x

    @no_second_derivative.defjvp
    def _fail(primals, tangents):
        raise AssertionError("a second-order derivative was requested")

    @jax.custom_jvp
    def tanh(x):
        return jnp.tanh(x)

    @tanh.defjvp
    def _tanh_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        y = jnp.tanh(x)
        return y, no_second_derivative(1.0 - y ** 2) * t

    return tanh


def test_memrl_iteration_takes_no_second_derivative(monkeypatch):
    """With an activation whose derivative may not be differentiated again, MEMRL's whole
    meta-iteration still traces; ProMP's (second order) does not."""
    monkeypatch.setitem(ACTIVATIONS, "tanh", _once_differentiable_tanh())
    memrl = build()
    jax.jit(memrl.meta_iteration).lower(memrl.init(jax.random.PRNGKey(0)))
    promp = build("promp", inner_steps=1)
    with pytest.raises(AssertionError, match="second-order derivative"):
        jax.jit(promp.meta_iteration).lower(promp.init(jax.random.PRNGKey(0)))


def test_meta_iteration_applies_the_moreau_step():
    algorithm = build(meta_lr=0.5, proximal_lambda=2.0)
    state = algorithm.init(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(algorithm.meta_iteration)(state)
    _, task_key, sample_key = jax.random.split(state.key, 3)
    tasks = algorithm.env.sample_tasks(task_key, 3)
    pre, post, adapted = jax.jit(algorithm.adapt_and_sample)(state.params, tasks, sample_key)
    expected = jax.tree.map(lambda t, phi: t - 0.5 * 2.0 * (t - jnp.mean(phi, axis=0)),
                            state.params, adapted)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["post_return"]),
                               float(post.mean_episode_return()), rtol=1e-5)
    assert pre.rewards.shape[:2] == (3, 2)  # [M, K]
    assert algorithm.env_steps_per_iteration == 3 * 3 * 12 * 3
    assert float(metrics["proximal_distance"]) > 0.0


def test_memrl_adam_option_and_evaluation_shape():
    algorithm = build(meta_optimizer="adam", meta_lr=1e-3)
    state = algorithm.init(jax.random.PRNGKey(1))
    state, metrics = jax.jit(algorithm.meta_iteration)(state)
    assert np.isfinite(float(metrics["post_return"]))
    returns = jax.jit(algorithm.adaptation_returns, static_argnums=(2, 3, 4))(
        state.params, jax.random.PRNGKey(2), 4, 3, 2)
    assert returns.task_means.shape == returns.episodes.shape == (4, 4)
    with pytest.raises(run_config.ConfigError, match="meta_optimizer: 'lbfgs' not allowed"):
        run_config.resolve_config({"algo": "memrl", "meta_optimizer": "lbfgs"})
