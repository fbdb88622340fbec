"""ProMP: the inner step at the sampling policy, the meta-gradient against finite
differences, the KL rule, and compile-once behaviour of the meta-iteration."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarl_jax.advantages import process_phase
from metarl_jax.algorithms.common import sample_adaptation_phases
from metarl_jax.algorithms.promp import ProMP, ProMPConfig, adapt_kl_coeffs
from metarl_jax.envs import make_env
from metarl_jax.losses import (inner_update, likelihood_ratio, lvc_inner_loss,
                               lvc_inner_loss_with_kl, masked_mean, mean_kl_from_sampler,
                               promp_clipped_objective)
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import collect


def plain_policy_gradient_loss(policy, params, batch):
    """The vanilla (REINFORCE) surrogate −mean(log π(a|s) Â), written independently."""
    log_probs = policy.log_prob(params, batch.observations, batch.actions)
    return -jnp.sum(log_probs * batch.advantages * batch.masks) / jnp.sum(batch.masks)


@pytest.fixture(scope="module")
def point_nav_batch():
    env = make_env("point-nav")
    policy = GaussianPolicy(2, 2, (16, 16))
    params = policy.init(jax.random.PRNGKey(1))
    tasks = env.sample_tasks(jax.random.PRNGKey(2), 3)
    batch = collect(env, policy, params, tasks, jax.random.PRNGKey(3), 4, 20,
                    per_task_params=False)
    batch = process_phase(batch, 0.99, 1.0)
    return policy, params, jax.tree.map(lambda x: x[0], batch)  # one task's batch


def test_fused_lvc_loss_and_kl_equal_the_separate_functions(point_nav_batch):
    """ProMP's one-forward (LVC loss, KL) pair: values, the inner step and the gradient
    through both, away from the sampling policy so the KL is not at its minimum."""
    policy, params, batch = point_nav_batch
    params = jax.tree.map(lambda x: x + 0.05, params)

    def separate(p):
        return lvc_inner_loss(policy, p, batch), mean_kl_from_sampler(policy, p, batch)

    np.testing.assert_allclose(lvc_inner_loss_with_kl(policy, params, batch), separate(params),
                               rtol=1e-6)
    assert float(separate(params)[1]) > 1e-3

    def outer(p, inner_loss, has_aux):
        adapted = inner_update(inner_loss, policy, p, batch, 0.1, has_aux=has_aux)
        adapted, kl = adapted if has_aux else (adapted, mean_kl_from_sampler(policy, p, batch))
        return jnp.sum(adapted["params"]["Dense_2"]["kernel"] ** 2) + kl

    fused = jax.grad(outer)(params, lvc_inner_loss_with_kl, True)
    reference = jax.grad(outer)(params, lvc_inner_loss, False)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_likelihood_ratio_is_one_at_the_sampling_policy(point_nav_batch):
    policy, params, batch = point_nav_batch
    ratio = likelihood_ratio(policy, params, batch)
    np.testing.assert_allclose(np.asarray(ratio), 1.0, atol=1e-5)
    objective, clip_fraction = promp_clipped_objective(policy, params, batch, 0.3)
    assert float(clip_fraction) == 0.0
    np.testing.assert_allclose(float(objective),
                               float(masked_mean(batch.advantages, batch.masks)), atol=1e-5)


def test_lvc_inner_gradient_equals_plain_policy_gradient(point_nav_batch):
    policy, params, batch = point_nav_batch
    lvc = jax.grad(lvc_inner_loss, argnums=1)(policy, params, batch)
    vanilla = jax.grad(plain_policy_gradient_loss, argnums=1)(policy, params, batch)
    for a, b in zip(jax.tree.leaves(lvc), jax.tree.leaves(vanilla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # ...but they differ away from the sampling policy, where logp_old stays fixed.
    moved = jax.tree.map(lambda p: p + 0.05, params)
    lvc = jax.grad(lvc_inner_loss, argnums=1)(policy, moved, batch)
    vanilla = jax.grad(plain_policy_gradient_loss, argnums=1)(policy, moved, batch)
    gap = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(lvc), jax.tree.leaves(vanilla)))
    assert gap > 1e-3


def test_adaptive_kl_rule():
    coeffs = jnp.array([1.0, 1.0, 1.0])
    kls = jnp.array([0.001, 0.01, 0.1])  # below target/1.5, inside, above 1.5·target
    np.testing.assert_allclose(np.asarray(adapt_kl_coeffs(coeffs, kls, 0.01)),
                               [0.5, 1.0, 2.0])


def test_promp_meta_gradient_matches_finite_differences():
    """Second-order meta-gradient (through K = 2 LVC steps, clip and KL terms) against
    central differences of the very same loss, in float64, at a θ away from the
    sampling policy so that the stored logp_old and π_old matter."""
    with jax.enable_x64(True):
        env = make_env("point-nav")
        config = ProMPConfig(meta_batch_size=2, episodes_per_task=3, horizon=6, inner_steps=2,
                             inner_lr=0.5, hidden_sizes=(5,), kl_coeff=0.3)
        policy = GaussianPolicy(2, 2, config.hidden_sizes)
        algorithm = ProMP(config, env, policy)
        theta = jax.tree.map(lambda x: x.astype(jnp.float64),
                             policy.init(jax.random.PRNGKey(0)))
        tasks = env.sample_tasks(jax.random.PRNGKey(1), config.meta_batch_size)
        pre_batches, post_batch = sample_adaptation_phases(env, policy, config, theta, tasks,
                                                           jax.random.PRNGKey(2))
        assert pre_batches.advantages.dtype == jnp.float64
        kl_coeffs = jnp.array([0.3, 0.7])
        leaves, treedef = jax.tree.flatten(theta)
        shapes = [leaf.shape for leaf in leaves]
        flat_theta = jnp.concatenate([leaf.reshape(-1) for leaf in leaves])
        flat_theta = flat_theta + 0.02 * jax.random.normal(jax.random.PRNGKey(3),
                                                           flat_theta.shape, jnp.float64)

        def unflatten(flat):
            out, offset = [], 0
            for shape in shapes:
                size = int(np.prod(shape))
                out.append(flat[offset:offset + size].reshape(shape))
                offset += size
            return jax.tree.unflatten(treedef, out)

        def loss(flat):
            return algorithm.meta_loss(unflatten(flat), pre_batches, post_batch, kl_coeffs)[0]

        analytic = jax.jit(jax.grad(loss))(flat_theta)
        loss_jit = jax.jit(loss)
        step = 1e-6
        basis = jnp.eye(flat_theta.size, dtype=jnp.float64)
        numeric = jax.vmap(lambda e: (loss_jit(flat_theta + step * e)
                                      - loss_jit(flat_theta - step * e)) / (2 * step))(basis)
        assert float(jnp.abs(analytic).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(analytic), np.asarray(numeric), rtol=1e-5,
                                   atol=1e-8)

        # The second-order term is really there: treating the inner steps' displacement
        # φ_K − θ as a constant (first-order MAML) gives a measurably different gradient.
        pre_by_task = pre_batches

        def adapted_objective(flat, first_order):
            params = unflatten(flat)

            def task_objective(pre, post):
                def adapt(phi, batch):
                    return inner_update(lvc_inner_loss, policy, phi, batch,
                                        config.inner_lr), None
                adapted = jax.lax.scan(adapt, params, pre)[0]
                if first_order:
                    adapted = jax.tree.map(lambda p, a: p + jax.lax.stop_gradient(a - p),
                                           params, adapted)
                return promp_clipped_objective(policy, adapted, post, config.clip_eps)[0]

            return jnp.mean(jax.vmap(task_objective)(pre_by_task, post_batch))

        second = jax.grad(adapted_objective)(flat_theta, False)
        first = jax.grad(adapted_objective)(flat_theta, True)
        surrogate_only = -jax.grad(lambda f: algorithm.meta_loss(
            unflatten(f), pre_batches, post_batch, jnp.zeros(2))[0])(flat_theta)
        np.testing.assert_allclose(np.asarray(second), np.asarray(surrogate_only), rtol=1e-6,
                                   atol=1e-10)
        assert float(jnp.max(jnp.abs(first - second))) > 1e-3 * float(jnp.max(jnp.abs(second)))


@pytest.fixture(scope="module")
def tiny_promp():
    env = make_env("point-nav")
    config = ProMPConfig(meta_batch_size=4, episodes_per_task=3, horizon=10, promp_steps=2,
                         adaptive_kl=True, kl_coeff=1e-3)
    policy = GaussianPolicy(2, 2, (8, 8))
    algorithm = ProMP(config, env, policy)
    return algorithm, jax.jit(algorithm.meta_iteration)


def test_no_recompilation_after_first_iteration(tiny_promp):
    algorithm, meta_iteration = tiny_promp
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    state = algorithm.init(jax.random.PRNGKey(0))
    state, _ = meta_iteration(state)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            state, metrics = meta_iteration(state)
            jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert meta_iteration._cache_size() == 1
    assert int(state.iteration) == 3


def test_meta_iteration_metrics_and_adaptive_kl(tiny_promp):
    algorithm, meta_iteration = tiny_promp
    state = algorithm.init(jax.random.PRNGKey(5))
    new_state, metrics = meta_iteration(state)
    # At the first outer step the ratio is 1, so the loss is −mean(Â) + KL terms (= 0).
    assert abs(float(metrics["outer_loss_first"])) < 1e-5
    assert metrics["kl"].shape == (1,)
    assert float(metrics["kl"][0]) > 0.0
    expected = adapt_kl_coeffs(state.kl_coeffs, metrics["kl"], algorithm.config.kl_target)
    np.testing.assert_allclose(np.asarray(new_state.kl_coeffs), np.asarray(expected))
    assert not np.allclose(np.asarray(new_state.kl_coeffs), 1e-3)  # the rule fired
    assert algorithm.env_steps_per_iteration == 4 * 3 * 10 * 2
    changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                           state.params, new_state.params)
    assert min(jax.tree.leaves(changed)) > 0.0  # every leaf, log_std included, moves


def test_kl_penalty_enters_the_loss(point_nav_batch):
    """With the inner steps at the sampling policy, KL_0 = 0; after moving θ the loss
    grows by exactly c_0 · KL_0 when the coefficient is switched on."""
    policy, params, batch = point_nav_batch
    config = ProMPConfig(meta_batch_size=1, episodes_per_task=4, horizon=20, inner_steps=1)
    algorithm = ProMP(config, make_env("point-nav"), policy)
    pre = jax.tree.map(lambda x: x[None, None], batch)  # [M=1, K=1, ...]
    post = jax.tree.map(lambda x: x[None], batch)
    moved = jax.tree.map(lambda p: p + 0.03, params)
    without, aux = algorithm.meta_loss(moved, pre, post, jnp.zeros(1))
    with_kl, _ = algorithm.meta_loss(moved, pre, post, jnp.array([2.0]))
    assert float(aux["kls"][0]) > 0.0
    np.testing.assert_allclose(float(with_kl - without), 2.0 * float(aux["kls"][0]),
                               rtol=1e-4)


def test_adaptive_kl_reads_the_kls_at_the_final_theta(tiny_promp):
    """The reference recomputes the inner KLs after the last Adam step; the KLs of the
    last step's own evaluation (one step earlier) would give other coefficients."""
    algorithm, meta_iteration = tiny_promp
    state = algorithm.init(jax.random.PRNGKey(5))
    new_state, metrics = meta_iteration(state)
    _, task_key, sample_key = jax.random.split(state.key, 3)
    tasks = algorithm.env.sample_tasks(task_key, algorithm.config.meta_batch_size)
    pre, post = sample_adaptation_phases(algorithm.env, algorithm.policy, algorithm.config,
                                         state.params, tasks, sample_key)
    kls_at = jax.jit(lambda theta: algorithm.meta_loss(theta, pre, post, state.kl_coeffs)[1]["kls"])
    np.testing.assert_allclose(np.asarray(metrics["kl"]), np.asarray(kls_at(new_state.params)),
                               rtol=1e-4)
    # θ after the first of the two Adam steps, where the last step evaluated its KLs
    grads = jax.grad(lambda t: algorithm.meta_loss(t, pre, post, state.kl_coeffs)[0])(
        state.params)
    updates, _ = algorithm.optimizer.update(grads, state.opt_state, state.params)
    before_last = optax.apply_updates(state.params, updates)
    assert not np.allclose(np.asarray(kls_at(before_last)), np.asarray(metrics["kl"]),
                           rtol=1e-2)
