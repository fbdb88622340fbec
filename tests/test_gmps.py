"""GMPS phase 2: the importance-weighted inner step, the imitation outer loss through it,
the demonstrations and the DAgger buffer beside them, expert labels inside the action
bounds, the returns measured by meta-test adaptation, the bias-transformed meta-policy,
and the compiled meta-iteration on a prepared state."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax import run_config, run_dir
from metarl_jax.config import ConfigError
from metarl_jax.algorithms.common import (phase_returns, sample_adaptation_phases,
                                          standard_advantages)
from metarl_jax.demonstrations import (DaggerRing, append_to_ring, collect_demonstrations,
                                       expert_actions, load_demonstrations, save_demonstrations)
from metarl_jax.losses import (imitation_loss, importance_weighted_pg_loss, inner_update,
                               log_likelihood_loss)
from metarl_jax.policies import BiasTransformPolicy, GaussianPolicy, mlp_mean
from metarl_jax.rollout import collect

TINY = {"meta_batch_size": 3, "episodes_per_task": 3, "horizon": 12, "hidden_sizes": [8, 8]}
GMPS_TINY = {"num_train_tasks": 4, "imitation_steps": 5, "demo_buffer_size": 40,
             "dagger_buffer_size": 30, "expert_hidden_sizes": [8, 8]}
BOUND = 0.1  # point-nav clips the raw action to ±0.1


def build(**gmps_options):
    config = run_config.resolve_config({**run_config.DEFAULT_EXPERIMENT, **TINY, "algo": "gmps",
                                     "gmps": {**GMPS_TINY, **gmps_options}})
    return run_config.build(config)[2]


def with_synthetic_demos(algorithm, state, demos_per_task=10):
    """Fills the demonstrations with `demos_per_task` (s, a*) pairs per task (a* =
    (0.02 i, −0.02 i) for task i) and gives each task an expert whose mean action is the
    constant (i, −i), outside the ±0.1 bound for i ≥ 1."""
    T, D = state.demos.observations.shape[:2]
    observations = jax.random.normal(jax.random.PRNGKey(9), (T, D, 2)) * 0.3
    actions = 0.02 * jnp.stack([jnp.arange(T, dtype=jnp.float32),
                                -jnp.arange(T, dtype=jnp.float32)], -1)[:, None, :]
    actions = jnp.broadcast_to(actions, (T, D, 2))
    experts = state.expert_params
    experts["params"]["Dense_2"]["bias"] = jnp.asarray(
        np.stack([np.arange(T), -np.arange(T)], -1), jnp.float32)
    counts = jnp.full((T,), demos_per_task, jnp.int32)
    return state.replace(demos=state.demos.replace(observations=observations, actions=actions,
                                                   counts=counts), expert_params=experts)


def sampled_batch(algorithm, params):
    tasks = algorithm.env.sample_tasks(jax.random.PRNGKey(4), 3)
    batch = collect(algorithm.env, algorithm.policy, params, tasks, jax.random.PRNGKey(5), 3,
                    12, per_task_params=False)
    return standard_advantages(batch, algorithm.config)


def test_importance_weighted_gradient_is_plain_policy_gradient_at_theta_init():
    algorithm = build()
    theta = algorithm.init(jax.random.PRNGKey(0)).params["policy"]
    task_batch = jax.tree.map(lambda x: x[0], sampled_batch(algorithm, theta))
    weighted = jax.grad(importance_weighted_pg_loss, argnums=1)(algorithm.policy, theta,
                                                                task_batch)
    plain = jax.grad(log_likelihood_loss, argnums=1)(algorithm.policy, theta, task_batch)
    for a, b in zip(jax.tree.leaves(weighted), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    moved = jax.tree.map(lambda p: p + 0.05, theta)
    weighted = jax.grad(importance_weighted_pg_loss, argnums=1)(algorithm.policy, moved,
                                                                task_batch)
    plain = jax.grad(log_likelihood_loss, argnums=1)(algorithm.policy, moved, task_batch)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(weighted), jax.tree.leaves(plain))) > 1e-4


def test_clipped_importance_weights_bound_the_inner_gradient():
    from metarl_jax.algorithms.gmps import clipped_importance_weighted_pg_loss

    algorithm = build(importance_clip=2.0)
    theta = algorithm.init(jax.random.PRNGKey(0)).params["policy"]
    task_batch = jax.tree.map(lambda x: x[0], sampled_batch(algorithm, theta))
    clipped = functools.partial(clipped_importance_weighted_pg_loss, clip=2.0)
    # At θ_init every weight is 1: the plain policy gradient, clipped or not.
    for a, b in zip(jax.tree.leaves(jax.grad(clipped, argnums=1)(algorithm.policy, theta,
                                                                 task_batch)),
                    jax.tree.leaves(jax.grad(log_likelihood_loss, argnums=1)(
                        algorithm.policy, theta, task_batch))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # Far from θ_init (a narrow policy, moved), the weights lie in [1/2, 2]: the loss is
    # the log-likelihood loss with those weights.
    moved = jax.tree.map(lambda p: p + 0.3, theta)
    moved["params"]["log_std"] = jnp.full((2,), -2.0)
    log_probs = algorithm.policy.log_prob(moved, task_batch.observations, task_batch.actions)
    raw = np.asarray(log_probs - task_batch.log_probs)
    assert raw.max() > np.log(2.0) and raw.min() < -np.log(2.0)
    weights = np.exp(np.clip(raw, -np.log(2.0), np.log(2.0)))
    masks = np.asarray(task_batch.masks)
    expected = -np.sum(np.asarray(log_probs) * weights * np.asarray(task_batch.advantages)
                       * masks) / masks.sum()
    np.testing.assert_allclose(float(clipped(algorithm.policy, moved, task_batch)), expected,
                               rtol=1e-4)
    # The outer loss uses it when asked (and the unclipped loss by default).
    state = with_synthetic_demos(algorithm, algorithm.init(jax.random.PRNGKey(0)))
    batch = sampled_batch(algorithm, state.params["policy"])
    data = algorithm.expert_data(state, jnp.arange(3))
    far = {**state.params, "policy": moved}
    assert float(algorithm.outer_loss(far, batch, *data)) != float(
        build().outer_loss(far, batch, *data))
    with pytest.raises(run_config.ConfigError, match="gmps.importance_clip: 0.5 not allowed"):
        build(importance_clip=0.5)


def test_the_meta_policy_acts_with_sigma_floored_at_min_std():
    """`gmps.min_std` floors σ in everything the meta-policy computes (sampling, log
    probabilities, the metrics); below the floor log σ gets no gradient, above it the
    policy is the plain one."""
    floored = build(min_std=0.5)
    params = floored.init(jax.random.PRNGKey(0)).params["policy"]
    observations = jnp.zeros((3, 2))
    params["params"]["log_std"] = jnp.log(jnp.array([0.1, 0.8]))
    _, log_std = floored.policy.distribution(params, observations)
    np.testing.assert_allclose(np.exp(np.asarray(log_std[0])), [0.5, 0.8], rtol=1e-6)
    grad = jax.grad(lambda p: jnp.sum(floored.policy.log_prob(p, observations,
                                                              jnp.ones((3, 2)))))(params)
    log_std_grad = np.asarray(grad["params"]["log_std"])
    assert log_std_grad[0] == 0.0 and log_std_grad[1] != 0.0
    _, plain_log_std = build().policy.distribution(params, observations)
    np.testing.assert_allclose(np.exp(np.asarray(plain_log_std[0])), [0.1, 0.8], rtol=1e-6)


def test_outer_gradient_reaches_step_sizes_and_log_std():
    algorithm = build()
    state = with_synthetic_demos(algorithm, algorithm.init(jax.random.PRNGKey(0)))
    batch = sampled_batch(algorithm, state.params["policy"])
    ids = jnp.arange(3)
    observations, labels, weights = algorithm.expert_data(state, ids)
    grads = jax.grad(algorithm.outer_loss)(state.params, batch, observations, labels, weights)
    layers = {k: v for k, v in grads["step_sizes"]["params"].items() if k != "log_std"}
    assert "bias_transformation" in layers  # its step size is learned too
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(layers))
    # The MSE sees only the adapted mean, so α_logσ gets no gradient; but log σ itself
    # shapes the inner policy gradient of the mean weights, so the outer gradient reaches
    # it through the inner step.
    assert float(jnp.max(jnp.abs(grads["step_sizes"]["params"]["log_std"]))) == 0.0
    assert float(jnp.max(jnp.abs(grads["policy"]["params"]["log_std"]))) > 0
    # With the paper's negative log-likelihood, α_logσ is trained as well.
    nll = build(imitation="nll")
    grads = jax.grad(nll.outer_loss)(state.params, batch, observations, labels, weights)
    assert float(jnp.max(jnp.abs(grads["step_sizes"]["params"]["log_std"]))) > 0
    # The reference's σ² term on the MSE (`l2loss_std_mult`) trains α_logσ too.
    penalised = build(std_penalty=1.0)
    grads = jax.grad(penalised.outer_loss)(state.params, batch, observations, labels, weights)
    assert float(jnp.max(jnp.abs(grads["step_sizes"]["params"]["log_std"]))) > 0
    fixed = build(learned_step_sizes=False)
    assert set(fixed.init(jax.random.PRNGKey(0)).params) == {"policy"}


def test_mse_imitation_loss_adds_the_reference_std_term():
    policy = GaussianPolicy(2, 2, (4,), "tanh")
    params = policy.init(jax.random.PRNGKey(0))
    params["params"]["log_std"] = jnp.log(jnp.array([0.5, 2.0]))
    observations = jax.random.normal(jax.random.PRNGKey(1), (6, 2))
    labels = jnp.full((6, 2), 0.05)
    weights = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)  # the last two are padding
    mean, _ = policy.distribution(params, observations)
    squared_error = np.sum((np.asarray(mean) - 0.05) ** 2, axis=-1)[:4].mean()
    plain = imitation_loss(policy, params, observations, labels, weights, "mse")
    penalised = imitation_loss(policy, params, observations, labels, weights, "mse", 3.0)
    np.testing.assert_allclose(float(plain), squared_error, rtol=1e-5)
    np.testing.assert_allclose(float(penalised), squared_error + 3.0 * (0.25 + 4.0), rtol=1e-5)
    # The NLL trains σ itself and ignores the penalty.
    assert float(imitation_loss(policy, params, observations, labels, weights, "nll", 3.0)) \
        == float(imitation_loss(policy, params, observations, labels, weights, "nll"))


def test_ring_buffer_keeps_its_bound_and_only_real_steps():
    observations, actions = jnp.zeros((5, 2)), jnp.zeros((5, 1))
    new_obs = jnp.arange(14, dtype=jnp.float32).reshape(7, 2)
    new_actions = jnp.arange(7, dtype=jnp.float32)[:, None]
    masks = jnp.array([1, 1, 0, 1, 1, 1, 1], jnp.float32)
    ring = append_to_ring(DaggerRing(observations, actions, jnp.int32(3), jnp.int32(3)),
                          new_obs, new_actions, masks)
    assert int(ring.counts) == 5 and int(ring.next_slot) == (3 + 6) % 5
    # Rows 1, 3, 4, 5, 6 written at slots 4, 0, 1, 2, 3 (row 0 would share slot 3 with
    # row 6: of more rows than slots, the last ones are kept).
    np.testing.assert_array_equal(np.asarray(ring.actions[:, 0]), [3, 4, 5, 6, 1])
    # Many more rows than slots: exactly the last three, each slot written once.
    many = jnp.arange(40, dtype=jnp.float32)[:, None]
    ring = append_to_ring(DaggerRing(jnp.zeros((3, 1)), jnp.zeros((3, 1)), jnp.int32(0),
                                     jnp.int32(1)), many, many, jnp.ones(40))
    assert int(ring.counts) == 3 and int(ring.next_slot) == (1 + 40) % 3
    np.testing.assert_array_equal(np.sort(np.asarray(ring.actions[:, 0])), [37, 38, 39])


def test_dagger_never_displaces_a_demonstration():
    algorithm = build(dagger_every=1, dagger_buffer_size=30)
    state = with_synthetic_demos(algorithm, algorithm.init(jax.random.PRNGKey(0)),
                                 demos_per_task=10)
    demos = jax.device_get((state.demos.observations, state.demos.actions, state.demos.counts))
    step = jax.jit(algorithm.meta_iteration)
    for _ in range(3):  # 3 × 3 tasks × 36 visited states into rings of 30
        state, metrics = step(state)
    assert step._cache_size() == 1
    for kept, original in zip(jax.device_get((state.demos.observations, state.demos.actions,
                                              state.demos.counts)), demos):
        np.testing.assert_array_equal(kept, original)
    counts = np.asarray(state.dagger.counts)
    assert counts.max() == 30  # bounded
    for task in np.nonzero(counts)[0]:
        # Labelled with the task's expert, clipped to point-nav's ±0.1.
        label = np.clip([task, -task], -BOUND, BOUND)
        np.testing.assert_allclose(np.asarray(state.dagger.actions[task]),
                                   np.tile(label, (30, 1)), atol=1e-6)
    # The outer loss sees both: the 10 demonstrations and the DAgger states.
    task = int(np.nonzero(counts)[0][0])
    _, labels, weights = algorithm.expert_data(state, jnp.array([task]))
    assert float(jnp.sum(weights)) == 10 + 30
    np.testing.assert_allclose(np.asarray(labels[0, :10]),
                               np.tile([0.02 * task, -0.02 * task], (10, 1)), atol=1e-6)
    assert float(metrics["dagger_fill"]) == counts.mean()


def test_dagger_aggregates_from_its_first_iteration_on():
    algorithm = build(dagger_every=1, dagger_buffer_size=30, dagger_start=3)
    state = with_synthetic_demos(algorithm, algorithm.init(jax.random.PRNGKey(0)))
    step = jax.jit(algorithm.meta_iteration)
    fills = []
    for _ in range(3):
        state, metrics = step(state)
        fills.append(float(metrics["dagger_fill"]))
    assert fills[:2] == [0.0, 0.0] and fills[2] > 0  # iterations 1 and 2: nothing
    assert step._cache_size() == 1
    with pytest.raises(ConfigError, match="gmps.dagger_start"):
        build(dagger_start=3)  # without DAgger


def test_imitation_steps_switch_to_the_late_count_at_their_iteration():
    scheduled = build(imitation_steps=1, imitation_steps_late=3, imitation_steps_switch=2)
    early, late = build(imitation_steps=1), build(imitation_steps=3)
    state = with_synthetic_demos(scheduled, scheduled.init(jax.random.PRNGKey(0)))
    step = jax.jit(scheduled.meta_iteration)
    first, _ = step(state)  # iteration 1: one step, as `early`
    second, _ = step(first)  # iteration 2: three, as `late`
    assert step._cache_size() == 1
    chex.assert_trees_all_close(first.params, jax.jit(early.meta_iteration)(state)[0].params,
                                rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(second.params, jax.jit(late.meta_iteration)(first)[0].params,
                                rtol=1e-6, atol=1e-7)
    # Three steps move θ further than one would have from the same state.
    one_more = jax.jit(early.meta_iteration)(first)[0].params
    assert not np.allclose(np.asarray(jax.tree.leaves(second.params)[0]),
                           np.asarray(jax.tree.leaves(one_more)[0]))
    with pytest.raises(ConfigError, match="gmps.imitation_steps_switch"):
        build(imitation_steps_late=3)  # no iteration to switch at


def test_returns_are_measured_by_meta_test_adaptation_from_theta():
    short, long = build(imitation_steps=1), build(imitation_steps=5)
    state = with_synthetic_demos(short, short.init(jax.random.PRNGKey(0)))
    _, m_short = jax.jit(short.meta_iteration)(state)
    new_state, m_long = jax.jit(long.meta_iteration)(state)
    # θ's fresh episodes, the plain PG step with the learned step sizes, φ's fresh
    # episodes: all before the imitation steps, so their number does not matter ...
    for name in ("pre_return", "post_return"):
        assert float(m_short[name]) == float(m_long[name])
    # ... and they are exactly the shared meta-test phases on the iteration's tasks.
    _, choice_key, sample_key = jax.random.split(state.key, 3)
    task_ids = jax.random.choice(choice_key, 4, (3,), replace=False)
    tasks = jax.tree.map(lambda x: x[task_ids], state.train_tasks)
    expected = jax.jit(lambda: phase_returns(*sample_adaptation_phases(
        long.env, long.policy, long.config, state.params["policy"], tasks, sample_key,
        inner_loss=log_likelihood_loss, inner_lr=state.params["step_sizes"])))()
    for name in ("pre_return", "post_return", "post_episodes"):
        np.testing.assert_allclose(float(m_long[name]), float(expected[name]), rtol=1e-5)
    assert float(m_long["post_return"]) != float(m_long["pre_return"])
    assert new_state.iteration == 1
    # Two phases of M·N·H per iteration: θ's and the adapted policies'.
    assert long.env_steps_per_iteration == 2 * 3 * 3 * 12


def test_expert_labels_lie_inside_the_action_bounds(tmp_path):
    algorithm = build(dagger_every=1)
    env = algorithm.env
    assert env.raw_action_bound() == BOUND
    # Experts whose mean action (±3) is far outside point-nav's ±0.1.
    experts = jax.tree.map(jnp.zeros_like, algorithm.init(jax.random.PRNGKey(0)).expert_params)
    experts["params"]["Dense_2"]["bias"] = jnp.tile(jnp.array([3.0, -3.0]), (4, 1))
    tasks = env.sample_tasks(jax.random.PRNGKey(1), 4)
    demos = collect_demonstrations(env, algorithm.expert_policy, experts, tasks,
                                   jax.random.PRNGKey(2), 2, 12)
    assert np.max(np.abs(demos.actions)) <= np.float32(BOUND)
    np.testing.assert_allclose(demos.actions[..., 0], BOUND)
    labels = expert_actions(algorithm.expert_policy, experts, jnp.arange(4),
                            jnp.zeros((4, 5, 2)), BOUND)
    np.testing.assert_allclose(np.asarray(labels), np.tile([BOUND, -BOUND], (4, 5, 1)))
    # A file whose labels were stored unclipped is clipped when GMPS loads it.
    path = save_demonstrations(tmp_path / "wide.npz", env.name, tasks, demos.observations,
                               np.full_like(demos.actions, 5.0), demos.counts,
                               expert_params=jax.device_get(experts), hidden_sizes=(8, 8))
    prepared = build(demos=str(path), dagger_every=1)
    state = prepared.prepare(prepared.init(jax.random.PRNGKey(0)))
    assert np.max(np.abs(state.demos.actions)) <= np.float32(BOUND)
    state, _ = jax.jit(prepared.meta_iteration)(state)  # DAgger labels: clipped too
    assert int(jnp.max(state.dagger.counts)) > 0
    assert np.max(np.abs(state.dagger.actions)) <= np.float32(BOUND)


def test_meta_policy_appends_a_learned_bias_transformation():
    algorithm = build()
    assert isinstance(algorithm.policy, BiasTransformPolicy)
    params = algorithm.init(jax.random.PRNGKey(0)).params
    theta = params["policy"]
    np.testing.assert_array_equal(np.asarray(theta["params"]["bias_transformation"]),
                                  np.ones(4))
    assert theta["params"]["Dense_0"]["kernel"].shape == (2 + 4, 8)  # obs, then the bias
    np.testing.assert_array_equal(
        np.asarray(params["step_sizes"]["params"]["bias_transformation"]), np.full(4, 0.5))
    obs = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 2))
    mean, _ = algorithm.policy.distribution(theta, obs)
    inputs = jnp.concatenate([obs, jnp.ones((3, 5, 4))], axis=-1)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(mlp_mean(theta, inputs)),
                               atol=1e-6)
    # The inner step adapts it, with its own step size.
    batch = jax.tree.map(lambda x: x[0], sampled_batch(algorithm, theta))
    adapted = inner_update(log_likelihood_loss, algorithm.policy, theta, batch,
                           params["step_sizes"])
    assert float(jnp.max(jnp.abs(adapted["params"]["bias_transformation"] - 1.0))) > 1e-6
    plain = build(bias_transform_size=0)
    assert type(plain.policy) is GaussianPolicy
    assert "bias_transformation" not in plain.init(jax.random.PRNGKey(0)).params["policy"][
        "params"]


def test_dagger_labels_with_the_demonstration_files_expert_activation(tmp_path):
    env = build().env
    relu_expert = GaussianPolicy(2, 2, (8, 8), "relu")
    experts = jax.vmap(relu_expert.init)(jax.random.split(jax.random.PRNGKey(3), 4))
    # Small weights, so the experts' means stay inside ±0.1 and differ between the
    # activations; positive biases, so that ReLU and tanh disagree.
    experts = jax.tree.map(lambda x: 0.05 * x, experts)
    experts["params"]["Dense_0"]["bias"] = jnp.full((4, 8), 0.5)
    tasks = env.sample_tasks(jax.random.PRNGKey(1), 4)
    demos = collect_demonstrations(env, relu_expert, experts, tasks, jax.random.PRNGKey(2), 2,
                                   12)
    path = save_demonstrations(tmp_path / "relu.npz", env.name, tasks, demos.observations,
                               demos.actions, demos.counts, expert_params=experts,
                               hidden_sizes=(8, 8), activation="relu")
    assert load_demonstrations(path, env).activation == "relu"
    # A configuration that names another activation is refused, naming the field ...
    mismatched = build(demos=str(path), dagger_every=1)
    with pytest.raises(run_config.ConfigError, match="gmps.expert_activation: 'tanh', but the "
                                                  "experts in the demonstrations file use "
                                                  "'relu'"):
        mismatched.prepare(mismatched.init(jax.random.PRNGKey(0)))
    # ... and the matching one labels DAgger states with the ReLU experts.
    algorithm = build(demos=str(path), dagger_every=1, expert_activation="relu")
    assert algorithm.expert_policy.activation == "relu"
    state = algorithm.prepare(algorithm.init(jax.random.PRNGKey(0)))
    state, _ = jax.jit(algorithm.meta_iteration)(state)
    task = int(np.argmax(np.asarray(state.dagger.counts)))
    count = int(state.dagger.counts[task])
    visited = state.dagger.observations[task, :count]
    single = jax.tree.map(lambda x: x[task], experts)
    relu_means = relu_expert.distribution(single, visited)[0]
    tanh_means = GaussianPolicy(2, 2, (8, 8), "tanh").distribution(single, visited)[0]
    assert float(jnp.max(jnp.abs(relu_means - tanh_means))) > 1e-3
    np.testing.assert_allclose(np.asarray(state.dagger.actions[task, :count]),
                               np.asarray(jnp.clip(relu_means, -BOUND, BOUND)), atol=1e-6)


def test_meta_test_adaptation_uses_learned_step_sizes():
    algorithm = build()
    state = algorithm.init(jax.random.PRNGKey(0))
    returns = jax.jit(algorithm.adaptation_returns, static_argnums=(2, 3, 4))(
        state.params, jax.random.PRNGKey(1), 3, 1, 2)
    assert returns.task_means.shape == (3, 2)
    assert bool(jnp.all(jnp.isfinite(returns.task_means)))


def test_gmps_configuration_errors(tmp_path):
    with pytest.raises(run_config.ConfigError, match="gmps.imitation: 'l1' not allowed"):
        run_config.resolve_config({"algo": "gmps", "gmps": {"imitation": "l1"}})
    with pytest.raises(run_config.ConfigError, match="unknown key 'gmps.demo'"):
        run_config.resolve_config({"algo": "gmps", "gmps": {"demo": "x.npz"}})
    with pytest.raises(run_config.ConfigError, match="gmps.expert_activation: 'gelu' not"):
        run_config.resolve_config({"algo": "gmps", "gmps": {"expert_activation": "gelu"}})
    with pytest.raises(run_config.ConfigError, match="meta_batch_size: at most gmps.num_train"):
        build(num_train_tasks=2)
    env = build().env
    tasks = env.sample_tasks(jax.random.PRNGKey(1), 4)
    path = save_demonstrations(tmp_path / "long.npz", env.name, tasks, np.zeros((4, 50, 2)),
                               np.zeros((4, 50, 2)), np.full(4, 50))
    small = build(demos=str(path))
    with pytest.raises(run_config.ConfigError, match="gmps.demo_buffer_size: 40 is smaller than "
                                                  "the 50 demonstration steps per task"):
        small.prepare(small.init(jax.random.PRNGKey(0)))


def test_demonstrations_mode_and_experts_mode_from_the_cli(tmp_path):
    from click.testing import CliRunner

    from metarl_jax.cli import main

    demos = tmp_path / "demos.npz"
    result = CliRunner().invoke(main, [
        "experts", "--env", "point-nav", "--out", str(demos), "--tasks", "4",
        "--iterations", "3", "--quiet", "--set", "horizon=12", "--set", "hidden_sizes=[8, 8]",
        "--set", "episodes_per_iteration=2", "--set", "demos_per_task=2"])
    assert result.exit_code == 0, result.output
    common = ["--iterations", "2", "--quiet", "--set", "meta_batch_size=3",
              "--set", "episodes_per_task=3", "--set", "horizon=12",
              "--set", "hidden_sizes=[8, 8]", "--set", "gmps.num_train_tasks=4",
              "--set", "gmps.imitation_steps=3", "--set", "gmps.demo_buffer_size=200",
              "--set", "gmps.dagger_buffer_size=100",
              "--set", "gmps.expert_hidden_sizes=[8, 8]", "--set", "gmps.dagger_every=1"]
    run = tmp_path / "demos_mode"
    result = CliRunner().invoke(main, ["train", "--algo", "gmps", "--out", str(run),
                                       "--set", f"gmps.demos={demos}", *common])
    assert result.exit_code == 0, result.output
    records = run_dir.read_metrics(str(run))
    assert [r["iteration"] for r in records] == [1, 2]
    assert records[0]["expert_env_steps"] > 0
    assert records[-1]["dagger_fill"] > 0  # DAgger wrote to its buffers

    experts_run = tmp_path / "experts_mode"
    result = CliRunner().invoke(main, ["train", "--algo", "gmps", "--out", str(experts_run),
                                       "--set", "gmps.expert_iterations=2", *common])
    assert result.exit_code == 0, result.output
    (first, _) = run_dir.read_metrics(str(experts_run))
    # PPO's steps (2 iterations × 4 tasks × 10 episodes × 12 steps) plus the recorded
    # demonstrations, counted apart from the meta-training steps.
    assert first["expert_env_steps"] >= 2 * 4 * 10 * 12
    assert first["env_steps"] == 2 * 3 * 3 * 12

    # A demonstrations file for another environment is refused before training.
    bad = CliRunner().invoke(main, ["train", "--algo", "gmps", "--env", "halfcheetah-dir",
                                    "--out", str(tmp_path / "bad"),
                                    "--set", f"gmps.demos={demos}", *common])
    assert bad.exit_code == 2
    (line,) = [text for text in bad.output.splitlines() if text.startswith("error:")]
    assert line.startswith("error: demonstrations") and "env" in line
