"""The MAML family: every variant runs, its outer step does what its row of the table
says, and every experiment file resolves."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from metarl_jax import run_config
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.common import sample_adaptation_phases
from metarl_jax.algorithms.maml import (MAML_VARIANTS, emaml_exploration_term,
                                        normalized_post_rewards)
from metarl_jax.losses import dice_loss, masked_mean

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"meta_batch_size": 3, "episodes_per_task": 3, "horizon": 12, "hidden_sizes": [8, 8]}


def build(algo, **overrides):
    config = run_config.resolve_config({**run_config.DEFAULT_EXPERIMENT, **TINY, "algo": algo,
                                     **overrides})
    return run_config.build(config)[2]


def assert_fast_kl_hvp_is_exact(algorithm, theta, pre, post):
    """`meta_kl_hvp` (Gauss–Newton, factored) against autodiff's Hessian of the meta KL
    at the sampling θ, in float64."""
    from jax.flatten_util import ravel_pytree

    from metarl_jax.optim import hessian_vector_product

    flat = ravel_pytree(theta)[0]
    vector = jax.random.normal(jax.random.PRNGKey(3), flat.shape, jnp.float64)
    exact = hessian_vector_product(lambda t: algorithm.meta_kl(t, pre, post), theta)(vector)
    fast = algorithm.meta_kl_hvp(theta, pre, post)(vector)
    assert float(algorithm.meta_kl(theta, pre, post)) < 1e-20  # at the sampling θ
    np.testing.assert_allclose(np.asarray(fast), np.asarray(exact), rtol=1e-7, atol=1e-12)
    assert float(jnp.linalg.norm(exact)) > 1e-3


def sampled(algorithm, seed=0):
    state = algorithm.init(jax.random.PRNGKey(seed))
    tasks = algorithm.env.sample_tasks(jax.random.PRNGKey(seed + 1), 3)
    pre, post = sample_adaptation_phases(algorithm.env, algorithm.policy, algorithm.config,
                                         state.params, tasks, jax.random.PRNGKey(seed + 2),
                                         algorithm.inner_loss, algorithm.process)
    return state, pre, post


@pytest.mark.parametrize("variant", [v.name for v in MAML_VARIANTS])
def test_every_variant_runs_two_iterations(variant):
    algorithm = build(variant)
    step = jax.jit(algorithm.meta_iteration)
    state = algorithm.init(jax.random.PRNGKey(0))
    state, first = step(state)
    state, second = step(state)
    assert int(state.iteration) == 2 and step._cache_size() == 1
    for metrics in (first, second):
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(metrics))
    if algorithm.parts.outer_step.name == "trpo":
        for metrics in (first, second):
            if float(metrics["step_accepted"]) == 1.0:
                assert float(metrics["kl"]) <= algorithm.config.max_kl
                assert float(metrics["outer_loss_after"]) < float(metrics["outer_loss"])


def test_first_order_option_drops_the_second_order_term():
    second = build("maml-vpg")
    first = build("maml-vpg", first_order=True)
    state, pre, post = sampled(second)
    grad_second = jax.grad(lambda t: second.meta_loss(t, pre, post)[0])(state.params)
    grad_first = jax.grad(lambda t: first.meta_loss(t, pre, post)[0])(state.params)
    # Same loss value (same adapted parameters), different gradients.
    np.testing.assert_allclose(float(second.meta_loss(state.params, pre, post)[0]),
                               float(first.meta_loss(state.params, pre, post)[0]), rtol=1e-6)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(grad_second), jax.tree.leaves(grad_first)))
    assert gap > 1e-5

    # First order: the meta-gradient is the outer gradient at φ_K, taken as if at θ.
    def outer_at(phi, post_batch):
        return first.outer_loss(first.policy, phi, post_batch)

    def task_gradient(pre_i, post_i):
        phi = first.adapt(state.params, pre_i)[-1]
        return jax.grad(outer_at)(phi, post_i)

    expected = jax.tree.map(lambda g: jnp.mean(g, axis=0), jax.vmap(task_gradient)(pre, post))
    for a, b in zip(jax.tree.leaves(grad_first), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_emaml_exploration_term():
    algorithm = build("emaml-vpg", inner_steps=2)
    state, pre, post = sampled(algorithm)
    # R̃': post-update rewards normalised per step over the meta-batch, task means
    rewards, masks = np.asarray(post.rewards, np.float64), np.asarray(post.masks) > 0
    real = rewards[masks]
    normalised = (rewards - real.mean()) / (real.std() + 1e-8)
    task_signal = np.array([normalised[i][masks[i]].mean() for i in range(3)])
    np.testing.assert_allclose(np.asarray(normalized_post_rewards(post)), task_signal,
                               rtol=1e-4, atol=1e-6)
    # the term: −R̃'_0 · mean log π_θ over task 0's step-0 batch only (K = 2 here)
    first = jax.tree.map(lambda x: x[0, 0], pre)
    term = emaml_exploration_term(algorithm.policy, state.params, first, task_signal[0])
    log_probs = algorithm.policy.log_prob(state.params, first.observations, first.actions)
    np.testing.assert_allclose(float(term),
                               -task_signal[0] * float(masked_mean(log_probs, first.masks)),
                               rtol=1e-5)
    plain = build("maml-vpg", inner_steps=2)
    with_term = algorithm.meta_loss(state.params, pre, post)
    without = plain.meta_loss(state.params, pre, post)
    exploration = float(with_term[1]["exploration"])
    np.testing.assert_allclose(float(with_term[0] - without[0]), exploration,
                               rtol=1e-5, atol=1e-7)
    expected = np.mean([
        -task_signal[i] * float(masked_mean(
            algorithm.policy.log_prob(state.params, pre.observations[i, 0], pre.actions[i, 0]),
            pre.masks[i, 0])) for i in range(3)])
    np.testing.assert_allclose(exploration, expected, rtol=1e-4)
    assert abs(exploration) > 1e-4


def test_dice_phase_uses_adjusted_rewards():
    algorithm = build("dice-vpg", dice_baseline=False, discount=0.9,
                      normalize_advantages=False)
    _, pre, _ = sampled(algorithm)
    batch = jax.tree.map(lambda x: x[0, 0], pre)
    discounts = 0.9 ** jnp.arange(batch.rewards.shape[-1])
    np.testing.assert_allclose(np.asarray(batch.advantages),
                               np.asarray(batch.rewards * discounts * batch.masks), rtol=1e-6)


def test_dice_adjusted_rewards_are_normalised_per_task_by_default():
    algorithm = build("dice-vpg")
    assert algorithm.config.normalize_advantages
    _, pre, _ = sampled(algorithm)
    raw = build("dice-vpg", normalize_advantages=False)
    _, raw_pre, _ = sampled(raw)
    for task in range(3):
        adjusted = np.asarray(pre.advantages[task, 0])
        real = np.asarray(pre.masks[task, 0]) > 0
        np.testing.assert_allclose(adjusted[real].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(adjusted[real].std(), 1.0, rtol=1e-4)
        unnormalised = np.asarray(raw_pre.advantages[task, 0])[real]
        np.testing.assert_allclose(
            adjusted[real], (unnormalised - unnormalised.mean()) / (unnormalised.std() + 1e-8),
            rtol=1e-3, atol=1e-4)


def test_variant_table():
    table = {v.name: (v.parts.inner.name, v.parts.outer.name, v.parts.outer_step.name,
                      v.parts.exploration is not None) for v in MAML_VARIANTS}
    assert table == {
        "maml-trpo": ("ll", "ratio", "trpo", False),
        "maml-vpg": ("ll", "ll", "adam", False),
        "emaml-trpo": ("ll", "ratio", "trpo", True),
        "emaml-vpg": ("ll", "ll", "adam", True),
        "lvc-trpo": ("lvc", "ratio", "trpo", False),
        "lvc-vpg": ("lvc", "ll", "adam", False),
        "dice-vpg": ("dice", "dice", "adam", False),
    }
    trpo = ALGORITHMS["maml-trpo"].config_class()
    assert (trpo.max_kl, trpo.cg_iterations, trpo.cg_damping, trpo.backtrack_ratio,
            trpo.max_backtracks) == (0.01, 10, 1e-5, 0.8, 15)
    assert ALGORITHMS["maml-vpg"].config_class().outer_lr == 1e-3


def test_trpo_option_on_vpg_algorithm_is_a_config_error():
    with pytest.raises(run_config.ConfigError, match="max_kl: an option of emaml-trpo, "
                                                  "lvc-trpo, maml-trpo, not of algo maml-vpg"):
        run_config.resolve_config({"algo": "maml-vpg", "max_kl": 0.02})


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_experiment_files_resolve(path):
    raw = yaml.safe_load(path.read_text())
    resolved = run_config.resolve_config(raw).to_dict()
    assert resolved["algo"] == raw["algo"]
    for key, value in raw.items():  # what a file sets is what the run gets
        if isinstance(value, dict):
            assert value.items() <= resolved[key].items(), key
        else:
            assert resolved[key] == (list(value) if isinstance(value, tuple) else value), key


@pytest.mark.parametrize("algo, first_order", [("maml-trpo", False), ("lvc-trpo", False),
                                               ("maml-trpo", True)])
def test_gauss_newton_kl_product_equals_autodiff_hessian_at_sampling_parameters(algo,
                                                                                first_order):
    """The TRPO variants' fast Fisher-vector product (inner-step Hessians applied on both
    sides) is the exact Hessian of the meta KL at θ, two inner steps deep."""
    from jax.flatten_util import ravel_pytree

    from metarl_jax.optim import hessian_vector_product

    with jax.enable_x64(True):
        algorithm = build(algo, inner_steps=2, first_order=first_order)
        state = algorithm.init(jax.random.PRNGKey(0))
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), state.params)
        tasks = algorithm.env.sample_tasks(jax.random.PRNGKey(1), 3)
        pre, post = sample_adaptation_phases(algorithm.env, algorithm.policy, algorithm.config,
                                             theta, tasks, jax.random.PRNGKey(2),
                                             algorithm.inner_loss, algorithm.process)
        assert_fast_kl_hvp_is_exact(algorithm, theta, pre, post)


def test_dice_cumulative_log_likelihood_restarts_with_each_episode():
    """A lane holding two episodes has the DiCE gradient of the same two episodes held
    in separate lanes: τ_t never reaches back into the previous episode."""
    algorithm = build("dice-vpg")
    state, pre, _ = sampled(algorithm)
    lane = jax.tree.map(lambda x: x[0, 0, 0], pre)  # one lane, [H]
    horizon, split = lane.rewards.shape[0], 5
    steps = jnp.arange(horizon)
    joined = lane.replace(
        masks=jnp.ones(horizon), dones=(steps == split - 1).astype(jnp.float32),
        timesteps=jnp.where(steps < split, steps, steps - split).astype(jnp.float32))

    def separate(first):  # the episode alone, moved to the start of its own lane
        keep = (steps < split) if first else (steps >= split)
        alone = lane.replace(masks=keep.astype(jnp.float32),
                             advantages=lane.advantages * keep)
        alone = jax.tree.map(lambda x: jnp.roll(x, 0 if first else -split, axis=0), alone)
        return alone.replace(dones=jnp.zeros(horizon), timesteps=steps.astype(jnp.float32))

    apart = jax.tree.map(lambda a, b: jnp.stack([a, b]), separate(True), separate(False))
    grad = jax.grad(dice_loss, argnums=1)
    together = grad(algorithm.policy, state.params, jax.tree.map(lambda x: x[None], joined))
    separately = grad(algorithm.policy, state.params, apart)
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(separately)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # and without the restart the gradient is different
    no_restart = joined.replace(timesteps=steps.astype(jnp.float32))
    differs = grad(algorithm.policy, state.params, jax.tree.map(lambda x: x[None], no_restart))
    assert not all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-3) for a, b in
                   zip(jax.tree.leaves(together), jax.tree.leaves(differs)))


# --- the TRPO variants' options: `averaging` and `kl_direction` -----------------------

# Episodes of a task's first three lanes, as (lane, steps): lane 0 reaches its goal at
# step 1 and idles, lane 1 ends an episode at step 3 and starts a fresh one, lane 2 runs
# to the end of the lane.
def lane_episodes(horizon):
    return [(0, [0, 1]), (1, [0, 1, 2, 3]), (1, list(range(4, horizon))),
            (2, list(range(horizon)))]


def episode_pattern(horizon):
    """The masks and dones [3, H] of `lane_episodes`."""
    masks = np.ones((3, horizon), np.float32)
    masks[0, 2:] = 0.0
    dones = np.zeros((3, horizon), np.float32)
    dones[0, 1] = dones[1, 3] = 1.0
    return masks, dones


def with_episode_pattern(batch):
    """`batch` ([..., 3, H]) with the masks and dones of `lane_episodes` in every task."""
    masks, dones = episode_pattern(batch.masks.shape[-1])
    shape, dtype = batch.masks.shape, batch.masks.dtype
    return batch.replace(masks=jnp.broadcast_to(masks, shape).astype(dtype),
                         dones=jnp.broadcast_to(dones, shape).astype(dtype))


def per_episode_mean(values, horizon):
    """The mean over `lane_episodes` of each episode's mean, one task's values [3, H]."""
    return np.mean([np.mean(values[lane, steps]) for lane, steps in lane_episodes(horizon)])


def all_steps_mean(values, horizon):
    """The mean over every real step of `lane_episodes`, one task's values [3, H]."""
    masks = episode_pattern(horizon)[0]
    return np.sum(values * masks) / np.sum(masks)


def numpy_gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(p ‖ q) of diagonal Gaussians, summed over action dimensions (float64)."""
    var_p, var_q = np.exp(2 * log_std_p), np.exp(2 * log_std_q)
    return np.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5,
                  axis=-1)


def test_episode_weights_average_each_episode_over_its_own_steps():
    from metarl_jax.losses import episode_mean, episode_weights

    masks, dones = (jnp.asarray(x) for x in episode_pattern(6))
    np.testing.assert_allclose(np.asarray(episode_weights(masks, dones)),
                               [[1 / 2, 1 / 2, 0, 0, 0, 0],
                                [1 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 2, 1 / 2],
                                [1 / 6] * 6], rtol=1e-6)
    values = np.arange(18, dtype=np.float32).reshape(3, 6) ** 1.5
    np.testing.assert_allclose(float(episode_mean(jnp.asarray(values), masks, dones)),
                               per_episode_mean(values, 6), rtol=1e-6)
    # with a leading task axis, the mean over both tasks' episodes
    two = jnp.stack([jnp.asarray(values), 2 * jnp.asarray(values)])
    np.testing.assert_allclose(float(episode_mean(two, jnp.stack([masks] * 2),
                                                  jnp.stack([dones] * 2))),
                               1.5 * per_episode_mean(values, 6), rtol=1e-6)


def moved_away(params, scale=0.05, seed=7):
    """θ shifted off the sampling parameters, so that ratios differ from 1 and KLs from 0."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def test_per_episode_averaging_of_the_inner_loss_and_the_outer_surrogate():
    steps = build("maml-trpo", horizon=6)
    episodes = build("maml-trpo", horizon=6, averaging="episodes")
    lvc = build("lvc-trpo", horizon=6, averaging="episodes")
    state, pre, post = sampled(steps)
    theta = moved_away(state.params)
    post = jax.tree.map(lambda x: x[0], with_episode_pattern(post))  # task 0, [3, H]
    log_probs = np.asarray(steps.policy.log_prob(theta, post.observations, post.actions),
                           np.float64)
    advantages = np.asarray(post.advantages, np.float64)
    ratio = np.exp(log_probs - np.asarray(post.log_probs, np.float64))
    # inner loss −mean log π Â, outer surrogate −mean r Â (LVC's inner loss is the latter)
    for loss, algorithm, term in (("inner", episodes, log_probs * advantages),
                                  ("outer", episodes, ratio * advantages),
                                  ("inner", lvc, ratio * advantages)):
        fn = algorithm.inner_loss if loss == "inner" else algorithm.outer_loss
        np.testing.assert_allclose(float(fn(algorithm.policy, theta, post)),
                                   -per_episode_mean(term, 6), rtol=1e-5)
        default = steps.inner_loss if loss == "inner" else steps.outer_loss
        if algorithm is episodes:  # the default form: every real step alike
            np.testing.assert_allclose(float(default(steps.policy, theta, post)),
                                       -all_steps_mean(term, 6), rtol=1e-5)
            assert abs(per_episode_mean(term, 6) - all_steps_mean(term, 6)) > 1e-3


@pytest.mark.parametrize("averaging", ["steps", "episodes"])
@pytest.mark.parametrize("kl_direction", ["old_new", "new_old"])
def test_meta_kl_direction_and_averaging(averaging, kl_direction):
    algorithm = build("maml-trpo", horizon=6, averaging=averaging, kl_direction=kl_direction)
    state, pre, post = sampled(algorithm)
    post = with_episode_pattern(post)
    theta = moved_away(state.params)
    expected = []
    for task in range(3):
        task_pre, task_post = (jax.tree.map(lambda x, i=task: x[i], b) for b in (pre, post))
        phi = algorithm.adapt(theta, task_pre)[-1]
        mean, log_std = (np.asarray(x, np.float64) for x in
                         algorithm.policy.distribution(phi, task_post.observations))
        old_mean, old_log_std = (np.asarray(x, np.float64) for x in
                                 (task_post.means, task_post.log_stds))
        kl = (numpy_gaussian_kl(old_mean, old_log_std, mean, log_std)
              if kl_direction == "old_new"
              else numpy_gaussian_kl(mean, log_std, old_mean, old_log_std))
        average = per_episode_mean if averaging == "episodes" else all_steps_mean
        expected.append(average(kl, 6))
    np.testing.assert_allclose(float(algorithm.meta_kl(theta, pre, post)), np.mean(expected),
                               rtol=1e-4)
    other = build("maml-trpo", horizon=6, averaging=averaging,
                  kl_direction="new_old" if kl_direction == "old_new" else "old_new")
    gap = float(algorithm.meta_kl(theta, pre, post)) - float(other.meta_kl(theta, pre, post))
    assert abs(gap) > 1e-3 * np.mean(expected)


def relabelled(algorithm, theta, pre, post):
    """`post` as if sampled by φ_K(θ) re-derived on `pre` (its stored distribution and
    log-likelihoods recomputed), so that θ is the sampling θ of the edited batches."""

    def task(task_pre, task_post):
        phi = algorithm.adapt(theta, task_pre)[-1]
        mean, log_std = algorithm.policy.distribution(phi, task_post.observations)
        log_probs = algorithm.policy.log_prob(phi, task_post.observations, task_post.actions)
        return task_post.replace(means=mean, log_stds=log_std, log_probs=log_probs)

    return jax.vmap(task)(pre, post)


@pytest.mark.parametrize("algo, averaging, kl_direction", [
    ("maml-trpo", "episodes", "old_new"), ("maml-trpo", "steps", "new_old"),
    ("lvc-trpo", "episodes", "new_old")])
def test_gauss_newton_kl_product_is_exact_under_the_options(algo, averaging, kl_direction):
    """With either KL direction and either averaging (episodes of unequal lengths in the
    inner batches and the post-update one), the fast product is the meta KL's Hessian."""
    from jax.flatten_util import ravel_pytree

    from metarl_jax.optim import hessian_vector_product

    with jax.enable_x64(True):
        algorithm = build(algo, inner_steps=2, averaging=averaging, kl_direction=kl_direction)
        state = algorithm.init(jax.random.PRNGKey(0))
        theta = jax.tree.map(lambda x: x.astype(jnp.float64), state.params)
        tasks = algorithm.env.sample_tasks(jax.random.PRNGKey(1), 3)
        pre, post = sample_adaptation_phases(algorithm.env, algorithm.policy, algorithm.config,
                                             theta, tasks, jax.random.PRNGKey(2),
                                             algorithm.inner_loss, algorithm.process)
        pre = with_episode_pattern(pre)  # [M, K, 3, H]
        post = relabelled(algorithm, theta, pre, with_episode_pattern(post))
        assert_fast_kl_hvp_is_exact(algorithm, theta, pre, post)


def test_trpo_iteration_with_both_options_keeps_the_kl_bound():
    algorithm = build("maml-trpo", averaging="episodes", kl_direction="new_old")
    state, metrics = jax.jit(algorithm.meta_iteration)(algorithm.init(jax.random.PRNGKey(0)))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(metrics))
    if float(metrics["step_accepted"]) == 1.0:
        assert float(metrics["kl"]) <= algorithm.config.max_kl
        assert float(metrics["outer_loss_after"]) < float(metrics["outer_loss"])
