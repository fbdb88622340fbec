"""The hand-written MLP forward (`mlp_mean`) against flax's own `apply` on the same tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax.policies import COLUMNWISE_OUTPUT_MAX, GaussianPolicy


@pytest.mark.parametrize("action_size", [2, 6])  # column-wise and plain output layer
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("batch_shape", [(), (7,), (3, 5)])
def test_distribution_matches_flax_apply(action_size, activation, batch_shape):
    assert 2 <= COLUMNWISE_OUTPUT_MAX < 6  # both output-layer forms are covered
    policy = GaussianPolicy(observation_size=3, action_size=action_size,
                            hidden_sizes=(16, 8), activation=activation)
    params = policy.init(jax.random.PRNGKey(0))
    # A non-zero bias and log_std, so every leaf shows up in the outputs and gradients.
    params = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape) / x.size,
                          params)
    obs = jax.random.normal(jax.random.PRNGKey(1), (*batch_shape, 3))
    actions = jax.random.normal(jax.random.PRNGKey(2), (*batch_shape, action_size))

    mean, log_std = policy.distribution(params, obs)
    flax_mean, flax_log_std = policy.network.apply(params, obs)
    assert mean.shape == log_std.shape == (*batch_shape, action_size)
    np.testing.assert_allclose(mean, flax_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_std, flax_log_std)

    def objective(distribution):
        def loss(p):
            m, s = distribution(p, obs)
            return jnp.sum(jnp.tanh(m - actions) * jnp.exp(s))
        # second order too, as the meta-gradients differentiate through a gradient step
        return lambda p: loss(jax.tree.map(lambda x, g: x - 0.5 * g, p, jax.grad(loss)(p)))

    ours = jax.grad(objective(policy.distribution))(params)
    theirs = jax.grad(objective(policy.network.apply))(params)
    # float32 second-order gradients: small entries carry rounding on the scale of the
    # leaf's largest ones (this CPU: 1.3e-6 on an entry of 1.5e-3 in a leaf up to 35)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("backend, columnwise", [("cpu", True), ("gpu", False),
                                                 ("tpu", False)])
def test_only_the_cpu_gets_the_columnwise_output_layer(monkeypatch, backend, columnwise):
    """The output layer's form is chosen by the backend the program is built for: a
    stack of matrix-vector products on CPU, one matrix product on accelerators."""
    policy = GaussianPolicy(observation_size=3, action_size=2, hidden_sizes=(8,))
    params = policy.init(jax.random.PRNGKey(0))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    jaxpr = jax.make_jaxpr(policy.distribution)(params, jnp.zeros((5, 3)))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    # One product for the hidden layer, then one per output unit or one for all.
    assert len(dots) == (1 + 2 if columnwise else 1 + 1)


@pytest.mark.parametrize("algo", ["promp", "gmps"])
def test_init_std_sets_the_initial_sigma_of_the_meta_policy(algo):
    """`init_std` reaches the policy every algorithm trains (GMPS's bias-transformed one
    included), and its default of 1 keeps log σ at exactly 0."""
    from metarl_jax.run_config import build, resolve_config

    for init_std, expected in ((0.5, np.log(0.5)), (1.0, 0.0)):
        config = resolve_config({"algo": algo, "env": {"name": "point-nav"},
                                 "init_std": init_std})
        _, _, algorithm = build(config)
        params = algorithm.policy.init(jax.random.PRNGKey(0))
        np.testing.assert_array_equal(params["params"]["log_std"],
                                      np.full((2,), expected, np.float32))
        mean, log_std = algorithm.policy.distribution(params, jnp.zeros((2,)))
        np.testing.assert_allclose(np.exp(log_std), init_std, rtol=1e-6)


def test_init_std_must_be_positive():
    from metarl_jax.config import ConfigError
    from metarl_jax.run_config import resolve_config

    with pytest.raises(ConfigError, match="init_std"):
        resolve_config({"algo": "promp", "env": {"name": "point-nav"}, "init_std": 0.0})


@pytest.mark.parametrize("algo", ["promp", "maml-trpo", "memrl"])
def test_min_std_floors_the_sigma_an_algorithm_samples_with_and_reports(algo):
    """`min_std` reaches the policy of every sampling learner: a meta-policy whose σ
    parameter starts below the floor acts with the floor, and `policy_std` reports it."""
    from metarl_jax.run_config import build, resolve_config

    tiny = {"algo": algo, "env": {"name": "point-nav"}, "meta_batch_size": 2,
            "episodes_per_task": 2, "horizon": 5, "hidden_sizes": [4], "init_std": 0.3}
    for min_std, expected in ((0.5, 0.5), (None, 0.3)):
        _, policy, algorithm = build(resolve_config({**tiny, "min_std": min_std}))
        assert policy.min_std == min_std
        state = algorithm.init(jax.random.PRNGKey(0))
        _, log_std = algorithm.policy.distribution(state.params, jnp.zeros((2,)))
        np.testing.assert_allclose(np.exp(log_std), expected, rtol=1e-6)
        _, metrics = jax.jit(algorithm.meta_iteration)(state)
        # One meta-iteration moves σ by a few per cent, nowhere near 0.5.
        assert float(metrics["policy_std"]) == pytest.approx(expected, rel=0.1)
        if min_std is not None:
            assert float(metrics["policy_std"]) == pytest.approx(min_std, rel=1e-6)


def test_min_std_is_refused_for_gmps_which_has_its_own():
    from metarl_jax.config import ConfigError
    from metarl_jax.run_config import build, resolve_config

    with pytest.raises(ConfigError, match="min_std: gmps floors its meta-policy's σ with "
                                          "gmps.min_std"):
        build(resolve_config({"algo": "gmps", "env": {"name": "point-nav"}, "min_std": 0.5}))
