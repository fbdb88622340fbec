"""GMPS phase 2: the importance-weighted inner step, the imitation outer loss through it,
the DAgger buffer, and the compiled meta-iteration on a prepared state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax import trainer
from metarl_jax.algorithms.gmps import append_to_buffer
from metarl_jax.losses import importance_weighted_pg_loss, log_likelihood_loss
from metarl_jax.rollout import collect
from metarl_jax.algorithms.common import standard_advantages

TINY = {"meta_batch_size": 3, "episodes_per_task": 3, "horizon": 12, "hidden_sizes": [8, 8]}
GMPS_TINY = {"num_train_tasks": 4, "imitation_steps": 5, "buffer_size": 40,
             "expert_hidden_sizes": [8, 8]}


def build(**gmps_options):
    config = trainer.resolve_config({**trainer.DEFAULT_EXPERIMENT, **TINY, "algo": "gmps",
                                     "gmps": {**GMPS_TINY, **gmps_options}})
    return trainer.build(config)[2]


def with_synthetic_demos(algorithm, state, demos_per_task=10):
    """Fills the buffer with `demos_per_task` (s, a*) pairs per task and gives each task
    an expert whose mean action is the constant (task index, −task index)."""
    T, B = state.buffer_observations.shape[:2]
    observations = jax.random.normal(jax.random.PRNGKey(9), (T, B, 2)) * 0.3
    actions = jnp.stack([jnp.arange(T, dtype=jnp.float32),
                         -jnp.arange(T, dtype=jnp.float32)], -1)[:, None, :]
    actions = jnp.broadcast_to(actions, (T, B, 2))
    experts = state.expert_params
    experts["params"]["Dense_2"]["bias"] = jnp.asarray(
        np.stack([np.arange(T), -np.arange(T)], -1), jnp.float32)
    counts = jnp.full((T,), demos_per_task, jnp.int32)
    return state.replace(buffer_observations=observations, buffer_actions=actions,
                         buffer_counts=counts, buffer_next=counts % B, expert_params=experts)


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


def test_outer_gradient_reaches_step_sizes_and_log_std():
    algorithm = build()
    state = with_synthetic_demos(algorithm, algorithm.init(jax.random.PRNGKey(0)))
    batch = sampled_batch(algorithm, state.params["policy"])
    ids = jnp.arange(3)
    weights = (jnp.arange(40)[None] < state.buffer_counts[ids][:, None]).astype(jnp.float32)
    grads = jax.grad(algorithm.outer_loss)(state.params, batch, state.buffer_observations[ids],
                                           state.buffer_actions[ids], weights)
    layers = {k: v for k, v in grads["step_sizes"]["params"].items() if k != "log_std"}
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(layers))
    # The MSE sees only the adapted mean, so α_logσ gets no gradient; but log σ itself
    # shapes the inner policy gradient of the mean weights, so the outer gradient reaches
    # it through the inner step.
    assert float(jnp.max(jnp.abs(grads["step_sizes"]["params"]["log_std"]))) == 0.0
    assert float(jnp.max(jnp.abs(grads["policy"]["params"]["log_std"]))) > 0
    # With the paper's negative log-likelihood, α_logσ is trained as well.
    nll = build(imitation="nll")
    grads = jax.grad(nll.outer_loss)(state.params, batch, state.buffer_observations[ids],
                                     state.buffer_actions[ids], weights)
    assert float(jnp.max(jnp.abs(grads["step_sizes"]["params"]["log_std"]))) > 0
    fixed = build(learned_step_sizes=False)
    assert set(fixed.init(jax.random.PRNGKey(0)).params) == {"policy"}


def test_ring_buffer_keeps_its_bound_and_only_real_steps():
    observations, actions = jnp.zeros((5, 2)), jnp.zeros((5, 1))
    new_obs = jnp.arange(14, dtype=jnp.float32).reshape(7, 2)
    new_actions = jnp.arange(7, dtype=jnp.float32)[:, None]
    masks = jnp.array([1, 1, 0, 1, 1, 1, 1], jnp.float32)
    observations, actions, count, next_slot = append_to_buffer(
        observations, actions, jnp.int32(3), jnp.int32(3), new_obs, new_actions, masks)
    assert int(count) == 5 and int(next_slot) == (3 + 6) % 5
    # Rows 0, 1, 3, 4, 5, 6 written at slots 3, 4, 0, 1, 2, 3 (row 6 overwrote row 0).
    np.testing.assert_array_equal(np.asarray(actions[:, 0]), [3, 4, 5, 6, 1])


def test_meta_iteration_with_dagger_labels_with_the_expert():
    algorithm = build(dagger_every=1, buffer_size=40)
    state = with_synthetic_demos(algorithm, algorithm.init(jax.random.PRNGKey(0)),
                                 demos_per_task=10)
    step = jax.jit(algorithm.meta_iteration)
    new_state, metrics = step(state)
    assert float(metrics["imitation_loss"]) < float(metrics["imitation_loss_first"])
    counts = np.asarray(new_state.buffer_counts)
    assert counts.max() == 40 and counts.min() == 10  # 3 of 4 tasks aggregated, capped
    for task in np.nonzero(counts == 40)[0]:
        labels = np.asarray(new_state.buffer_actions[task, 10:])
        np.testing.assert_allclose(labels, np.tile([task, -task], (30, 1)), atol=1e-6)
    state2, _ = step(new_state)  # still bounded, no recompilation
    assert int(jnp.max(state2.buffer_counts)) == 40 and step._cache_size() == 1
    assert algorithm.env_steps_per_iteration == 2 * 3 * 3 * 12


def test_meta_test_adaptation_uses_learned_step_sizes():
    algorithm = build()
    state = algorithm.init(jax.random.PRNGKey(0))
    returns = jax.jit(algorithm.adaptation_returns, static_argnums=(2, 3, 4))(
        state.params, jax.random.PRNGKey(1), 3, 1, 2)
    assert returns.shape == (3, 2) and bool(jnp.all(jnp.isfinite(returns)))


def test_gmps_configuration_errors():
    with pytest.raises(trainer.ConfigError, match="gmps.imitation: 'l1' not allowed"):
        trainer.resolve_config({"algo": "gmps", "gmps": {"imitation": "l1"}})
    with pytest.raises(trainer.ConfigError, match="unknown key 'gmps.demo'"):
        trainer.resolve_config({"algo": "gmps", "gmps": {"demo": "x.npz"}})
    with pytest.raises(trainer.ConfigError, match="meta_batch_size: at most gmps.num_train"):
        build(num_train_tasks=2)


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
              "--set", "gmps.imitation_steps=3", "--set", "gmps.buffer_size=200",
              "--set", "gmps.expert_hidden_sizes=[8, 8]", "--set", "gmps.dagger_every=1"]
    run = tmp_path / "demos_mode"
    result = CliRunner().invoke(main, ["train", "--algo", "gmps", "--out", str(run),
                                       "--set", f"gmps.demos={demos}", *common])
    assert result.exit_code == 0, result.output
    records = trainer.read_metrics(str(run))
    assert [r["iteration"] for r in records] == [1, 2]
    assert records[0]["expert_env_steps"] > 0
    assert records[-1]["buffer_fill"] > records[0]["buffer_fill"]  # DAgger appended

    experts_run = tmp_path / "experts_mode"
    result = CliRunner().invoke(main, ["train", "--algo", "gmps", "--out", str(experts_run),
                                       "--set", "gmps.expert_iterations=2", *common])
    assert result.exit_code == 0, result.output
    (first, _) = trainer.read_metrics(str(experts_run))
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
