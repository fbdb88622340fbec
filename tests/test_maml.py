"""The MAML family: every variant runs, its outer step does what its row of the table
says, and every experiment file resolves."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from metarl_jax import trainer
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.common import sample_adaptation_phases
from metarl_jax.algorithms.maml import MAML_VARIANTS, emaml_exploration_term
from metarl_jax.losses import masked_mean

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"meta_batch_size": 3, "episodes_per_task": 3, "horizon": 12, "hidden_sizes": [8, 8]}


def build(algo, **overrides):
    config = trainer.resolve_config({**trainer.DEFAULT_EXPERIMENT, **TINY, "algo": algo,
                                     **overrides})
    return trainer.build(config)[2]


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
    if algorithm.optimizer_kind == "trpo":
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
    algorithm = build("emaml-vpg")
    state, pre, post = sampled(algorithm)
    post_returns = jnp.mean(post.episode_returns(), axis=-1)
    normalised = (post_returns - post_returns.mean()) / (post_returns.std() + 1e-8)
    pre0 = jax.tree.map(lambda x: x[0], pre)  # task 0, [K, ...]
    term = emaml_exploration_term(algorithm.policy, [state.params], pre0, normalised[0])
    batch = jax.tree.map(lambda x: x[0], pre0)
    log_probs = algorithm.policy.log_prob(state.params, batch.observations, batch.actions)
    np.testing.assert_allclose(float(term),
                               -float(normalised[0]) * float(masked_mean(log_probs, batch.masks)),
                               rtol=1e-5)
    plain = build("maml-vpg")
    with_term = algorithm.meta_loss(state.params, pre, post)
    without = plain.meta_loss(state.params, pre, post)
    np.testing.assert_allclose(float(with_term[0] - without[0]),
                               float(with_term[1]["exploration"]), rtol=1e-5, atol=1e-7)
    assert abs(float(with_term[1]["exploration"])) > 1e-4


def test_dice_phase_uses_adjusted_rewards():
    algorithm = build("dice-vpg", dice_baseline=False, discount=0.9)
    _, pre, _ = sampled(algorithm)
    batch = jax.tree.map(lambda x: x[0, 0], pre)
    discounts = 0.9 ** jnp.arange(batch.rewards.shape[-1])
    np.testing.assert_allclose(np.asarray(batch.advantages),
                               np.asarray(batch.rewards * discounts * batch.masks), rtol=1e-6)


def test_variant_table():
    table = {v.name: (v.inner, v.outer, v.optimizer_kind, v.exploration) for v in MAML_VARIANTS}
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
    with pytest.raises(trainer.ConfigError, match="max_kl: an option of emaml-trpo, "
                                                  "lvc-trpo, maml-trpo, not of algo maml-vpg"):
        trainer.resolve_config({"algo": "maml-vpg", "max_kl": 0.02})


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_experiment_files_resolve(path):
    raw = yaml.safe_load(path.read_text())
    config = trainer.resolve_config(raw)
    assert config.run.algo == raw["algo"]
    assert dataclasses.asdict(config.algorithm)["meta_batch_size"] == raw["meta_batch_size"]


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
        flat = ravel_pytree(theta)[0]
        vector = jax.random.normal(jax.random.PRNGKey(3), flat.shape, jnp.float64)
        exact = hessian_vector_product(lambda t: algorithm.meta_kl(t, pre, post), theta)(vector)
        fast = algorithm.meta_kl_hvp(theta, pre, post)(vector)
        assert float(algorithm.meta_kl(theta, pre, post)) < 1e-20  # at the sampling θ
        np.testing.assert_allclose(np.asarray(fast), np.asarray(exact), rtol=1e-7, atol=1e-12)
        assert float(jnp.linalg.norm(exact)) > 1e-3
