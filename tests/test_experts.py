"""GMPS phase 1: PPO experts vmapped over tasks, demonstrations and their file format."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from metarl_jax.cli import EXIT_CONFIG_ERROR, main
from metarl_jax.config import ConfigError
from metarl_jax.envs import make_env
from metarl_jax.envs.base import EnvState, TaskEnv
from metarl_jax.demonstrations import (Demonstrations, collect_demonstrations, expert_actions,
                                       load_demonstrations, save_demonstrations)
from metarl_jax.experts import ExpertConfig
from metarl_jax.ppo import PPO, expert_policy, train_experts
from metarl_jax.rollout import collect

HORIZON = 25
NUM_TASKS = 4
CONFIG = ExpertConfig(num_tasks=NUM_TASKS, iterations=40, episodes_per_iteration=8,
                      horizon=HORIZON, hidden_sizes=(32, 32), value_hidden_sizes=(32, 32),
                      demos_per_task=4)


@pytest.fixture(scope="module")
def trained():
    env = make_env("point-nav", horizon=HORIZON)
    tasks = env.sample_tasks(jax.random.PRNGKey(3), NUM_TASKS)
    traces = []
    original = PPO.iteration

    def counted(self, *args):
        traces.append(1)  # runs only when jit traces the iteration
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PPO, "iteration", counted)
        params, info = train_experts(env, tasks, CONFIG, jax.random.PRNGKey(0))
    info["traces"] = len(traces)
    policy = expert_policy(env, CONFIG)
    return env, tasks, policy, params, info


@pytest.fixture(scope="module")
def demo_file(trained, tmp_path_factory):
    env, tasks, policy, params, _ = trained
    demos = collect_demonstrations(env, policy, params, tasks, jax.random.PRNGKey(5),
                                   CONFIG.demos_per_task, HORIZON)
    path = tmp_path_factory.mktemp("demos") / "demos.npz"
    save_demonstrations(path, env.name, tasks, demos.observations, demos.actions, demos.counts,
                        expert_params=params, hidden_sizes=CONFIG.hidden_sizes,
                        expert_env_steps=1234)
    return path, demos


def test_ppo_experts_improve_over_initial_policies(trained):
    _, _, _, params, info = trained
    returns = info["returns"]
    assert returns.shape == (CONFIG.iterations,)
    assert info["task_returns"].shape == (CONFIG.iterations, NUM_TASKS)
    assert info["env_steps"] == CONFIG.iterations * NUM_TASKS * 8 * HORIZON
    assert info["traces"] == 1  # one compiled iteration, reused by all 40
    initial, final = returns[0], returns[-3:].mean()
    # Random policies drift around the origin (about -12 over 25 steps); the experts walk
    # to their goals in a handful of steps.
    assert final > initial + 5.0, (initial, final)
    # Every expert improves on its own task, not only the average.
    per_task_gain = info["task_returns"][-3:].mean(axis=0) - info["task_returns"][0]
    assert np.all(per_task_gain > 2.0), per_task_gain
    # Stacked per-task parameters: leading axis T, and the experts differ.
    kernel = params["params"]["Dense_2"]["kernel"]
    assert kernel.shape == (NUM_TASKS, 32, 2)
    assert float(jnp.max(jnp.abs(kernel[0] - kernel[1]))) > 1e-3


def test_each_expert_walks_to_its_own_goal(trained):
    env, tasks, policy, params, _ = trained
    goals = np.asarray(tasks["goal"])
    demos = collect_demonstrations(env, policy, params, tasks, jax.random.PRNGKey(7), 2,
                                   HORIZON, deterministic=True)
    assert np.all(np.isfinite(demos.returns))
    last = demos.observations[np.arange(NUM_TASKS), demos.counts - 1]  # [T, 2]
    distances = np.linalg.norm(last[:, None, :] - goals[None, :, :], axis=-1)  # [expert, goal]
    own = np.diag(distances)
    others = (distances.sum(axis=1) - own) / (NUM_TASKS - 1)
    goal_gaps = np.linalg.norm(goals[:, None] - goals[None], axis=-1)[np.triu_indices(4, 1)]
    assert goal_gaps.min() > 0.25  # the test's tasks are distinguishable
    # Each expert ends within about one clipped step (0.1 per coordinate) of its own goal,
    # nearer to it than to any other task's goal.
    assert np.all(own < 0.15), own
    np.testing.assert_array_equal(np.argmin(distances, axis=1), np.arange(NUM_TASKS))
    assert np.all(own < others - 0.2), (own, others)
    # Deterministic, and the start is fixed: both episodes of a task are identical.
    assert np.all(demos.counts % 2 == 0)
    half = demos.counts // 2
    for t in range(NUM_TASKS):
        np.testing.assert_allclose(demos.observations[t, :half[t]],
                                   demos.observations[t, half[t]:2 * half[t]], atol=1e-6)


def test_demonstrations_keep_real_steps_pad_with_last_and_label_with_mean(trained, demo_file):
    env, _, policy, params, _ = trained
    _, demos = demo_file
    steps = demos.observations.shape[1]
    assert demos.observations.shape == (NUM_TASKS, steps, 2)
    assert demos.actions.shape == (NUM_TASKS, steps, 2)
    assert steps == demos.counts.max() <= CONFIG.demos_per_task * HORIZON
    assert np.all(demos.counts >= CONFIG.demos_per_task)
    # Every episode starts at the origin: exactly demos_per_task real steps sit at (0, 0)
    # (a trained expert never comes back to it), and padding repeats the last real step.
    for t in range(NUM_TASKS):
        real = demos.observations[t, :demos.counts[t]]
        at_origin = np.all(real == 0.0, axis=-1)
        assert at_origin.sum() == CONFIG.demos_per_task and at_origin[0]
        pad = demos.observations[t, demos.counts[t]:]
        assert np.all(pad == real[-1])
    # Labels are the expert's own mean action at the visited state, clipped to the
    # environment's raw action bound (point-nav: ±0.1).
    indices = np.repeat(np.arange(NUM_TASKS), steps)
    labels = expert_actions(policy, params, indices, demos.observations.reshape(-1, 2),
                            env.raw_action_bound())
    np.testing.assert_allclose(labels.reshape(demos.actions.shape), demos.actions, atol=1e-5)


def test_expert_actions_selects_each_tasks_expert(trained):
    _, _, policy, params, _ = trained
    obs = jnp.array([[0.1, -0.2], [0.1, -0.2], [0.3, 0.3]])
    indices = jnp.array([2, 0, 3])
    actions = expert_actions(policy, params, indices, obs)
    assert actions.shape == (3, 2)
    for row, t in enumerate([2, 0, 3]):
        single = jax.tree.map(lambda leaf, t=t: leaf[t], params)
        np.testing.assert_allclose(actions[row], policy.distribution(single, obs[row])[0],
                                   atol=1e-6)
    # Same state, different experts, different actions.
    assert float(jnp.max(jnp.abs(actions[0] - actions[1]))) > 1e-3


def test_save_load_round_trip(trained, demo_file):
    env, tasks, policy, params, _ = trained
    path, demos = demo_file
    loaded = load_demonstrations(path, env)
    assert isinstance(loaded, Demonstrations)
    assert loaded.env_name == "point-nav" and loaded.num_tasks == NUM_TASKS
    assert loaded.observations.dtype == np.float32 and loaded.actions.dtype == np.float32
    np.testing.assert_array_equal(loaded.observations, demos.observations)
    np.testing.assert_array_equal(loaded.actions, demos.actions)
    np.testing.assert_array_equal(loaded.counts, demos.counts)
    np.testing.assert_array_equal(loaded.tasks["goal"], np.asarray(tasks["goal"]))
    assert set(loaded.tasks) == {"goal"}
    assert loaded.hidden_sizes == (32, 32) and loaded.activation == "tanh"
    assert loaded.expert_env_steps == 1234
    assert jax.tree.structure(loaded.expert_params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded.expert_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert loaded.masks().sum() == demos.counts.sum()
    # The reloaded experts label states exactly as the originals.
    reloaded_policy = loaded.expert_policy(env)
    assert reloaded_policy == policy
    obs = loaded.observations[:, :5].reshape(-1, 2)
    indices = np.repeat(np.arange(NUM_TASKS), 5)
    np.testing.assert_array_equal(expert_actions(reloaded_policy, loaded.expert_params,
                                                 indices, obs),
                                  expert_actions(policy, params, indices, obs))
    # Exactly the given path: no ".npz" appended, no temporary left behind.
    assert sorted(p.name for p in pathlib.Path(path).parent.iterdir()) == ["demos.npz"]


def test_file_without_experts_loads_with_none(tmp_path):
    env = make_env("point-nav")
    tasks = env.sample_tasks(jax.random.PRNGKey(0), 2)
    path = save_demonstrations(tmp_path / "plain.npz", "point-nav", tasks,
                               np.zeros((2, 3, 2)), np.ones((2, 3, 2)), [3, 1])
    loaded = load_demonstrations(path, env)
    assert loaded.expert_params is None and loaded.hidden_sizes is None
    assert loaded.expert_policy(env) is None and loaded.expert_env_steps == 0
    np.testing.assert_array_equal(loaded.masks(), [[1, 1, 1], [1, 0, 0]])


# --- validation -------------------------------------------------------------------------


def _arrays(path):
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _write(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _drop(name):
    return lambda a: {k: v for k, v in a.items() if k != name}


def _set(name, fn):
    return lambda a: {**a, name: fn(a)}


def _nan_obs(a):
    obs = a["observations"].copy()
    obs[1, 2, 0] = np.nan
    return obs


CORRUPTIONS = {
    "missing_actions": (_drop("actions"), "missing 'actions'"),
    "missing_counts": (_drop("counts"), "missing 'counts'"),
    "wrong_env": (_set("env", lambda a: np.asarray("halfcheetah-dir")),
                  "env: written for 'halfcheetah-dir'; point-nav accepts demonstrations "
                  "of 'point-nav'"),
    "env_not_string": (_set("env", lambda a: np.arange(3)), "env: expected a 0-d string"),
    "obs_size": (_set("observations", lambda a: np.zeros(a["observations"].shape[:2] + (3,))),
                 "observations: size 3"),
    "action_size": (_set("actions", lambda a: np.zeros(a["actions"].shape[:2] + (1,))),
                    "actions: size 1"),
    "obs_rank": (_set("observations", lambda a: a["observations"][0]),
                 "observations: expected rank 3"),
    "t_mismatch": (_set("actions", lambda a: a["actions"][:-1]),
                   f"actions: {NUM_TASKS - 1} tasks but observations has {NUM_TASKS}"),
    "counts_t_mismatch": (_set("counts", lambda a: a["counts"][:-1]), "counts: 3 tasks"),
    "d_mismatch": (_set("actions", lambda a: a["actions"][:, :-1]), "actions: "),
    "missing_task_leaf": (_drop("task.goal"), "missing 'task.goal'"),
    "task_leaf_shape": (_set("task.goal", lambda a: np.zeros((NUM_TASKS, 3))),
                        "task.goal: expected shape [4, 2], got [4, 3]"),
    "task_leaf_t": (_set("task.goal", lambda a: np.zeros((2, 2))),
                    "task.goal: leading axis must be T = 4"),
    "unknown_task_leaf": (_set("task.velocity", lambda a: np.zeros(NUM_TASKS)),
                          "task.velocity: unknown task leaf"),
    "non_finite_obs": (_set("observations", _nan_obs), "observations: contains non-finite"),
    "non_finite_action": (_set("actions", lambda a: a["actions"] * np.inf),
                          "actions: contains non-finite"),
    "non_finite_expert": (_set("expert.params.log_std",
                               lambda a: np.full_like(a["expert.params.log_std"], np.nan)),
                          "expert.params.log_std: contains non-finite"),
    "counts_zero": (_set("counts", lambda a: np.zeros(NUM_TASKS, np.int64)),
                    "counts: out of range"),
    "counts_too_big": (_set("counts", lambda a: a["counts"] + a["observations"].shape[1]),
                       "counts: out of range"),
    "counts_float": (_set("counts", lambda a: a["counts"].astype(np.float32)),
                     "counts: expected integers"),
    "missing_expert_leaf": (_drop("expert.params.Dense_0.kernel"),
                            "missing 'expert.params.Dense_0.kernel'"),
    "expert_wrong_width": (_set("expert_hidden_sizes", lambda a: np.array([16, 32])),
                           "expert.params.Dense_0.bias: expected shape [4, 16], got [4, 32]"),
    "expert_without_sizes": (_drop("expert_hidden_sizes"), "missing 'expert_hidden_sizes'"),
    "bad_version": (_set("format_version", lambda a: np.asarray(7)), "format_version"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_invalid_files_raise_config_error_naming_the_field(trained, demo_file, tmp_path, case):
    env = trained[0]
    corrupt, expected = CORRUPTIONS[case]
    path = _write(tmp_path / "bad.npz", corrupt(_arrays(demo_file[0])))
    with pytest.raises(ConfigError) as caught:
        load_demonstrations(path, env)
    message = str(caught.value)
    assert message.startswith(f"demonstrations {path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_files_that_are_not_npz_archives_are_rejected(trained, tmp_path):
    env = trained[0]
    text = tmp_path / "notes.npz"
    text.write_text("observations, actions\n")
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    for path in (text, single):
        with pytest.raises(ConfigError, match=r"^demonstrations .*: not a valid \.npz archive"):
            load_demonstrations(path, env)
    with pytest.raises(ConfigError, match="no such file"):
        load_demonstrations(tmp_path / "absent.npz", env)


class _Payload:
    """Unpickling this object would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_object_arrays_are_rejected_without_unpickling(trained, demo_file, tmp_path):
    env = trained[0]
    marker = tmp_path / "unpickled"
    arrays = _arrays(demo_file[0])
    arrays["actions"] = np.array([_Payload(marker)], dtype=object)
    path = _write(tmp_path / "evil.npz", arrays)
    # The payload works: a pickle-enabled load would run it.
    with np.load(path, allow_pickle=True) as archive:
        archive["actions"]
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError) as caught:
        load_demonstrations(path, env)
    assert "actions: object arrays are not allowed" in str(caught.value)
    assert not marker.exists()
    # A raw pickle (not a zip archive) is refused as well.
    import pickle

    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match="not a valid .npz archive"):
        load_demonstrations(raw, env)
    assert not marker.exists()


def test_save_refuses_inconsistent_arrays(tmp_path):
    env = make_env("point-nav")
    tasks = env.sample_tasks(jax.random.PRNGKey(0), 2)
    with pytest.raises(ConfigError, match="counts: out of range"):
        save_demonstrations(tmp_path / "x.npz", "point-nav", tasks, np.zeros((2, 3, 2)),
                            np.zeros((2, 3, 2)), [4, 1])
    assert not (tmp_path / "x.npz").exists()


# --- command line -----------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


TINY = ("--tasks", "2", "--iterations", "3", "--set", "horizon=10",
        "--set", "episodes_per_iteration=2", "--set", "hidden_sizes=[8]",
        "--set", "value_hidden_sizes=[8]", "--set", "demos_per_task=2", "--quiet")


def test_cli_experts_writes_a_loadable_file(tmp_path):
    out = tmp_path / "sub" / "demos.npz"
    result = _cli("experts", "--env", "point-nav", "--out", str(out), "--seed", "4", *TINY)
    assert result.exit_code == 0, result.output
    assert "mean return" in result.output and f"written: {out}" in result.output
    steps = 3 * 2 * 2 * 10 + 2 * 2 * 10  # training + demonstration rollouts
    assert f"{steps} env steps" in result.output
    env = make_env("point-nav")
    loaded = load_demonstrations(out, env)
    assert loaded.num_tasks == 2 and loaded.hidden_sizes == (8,)
    assert loaded.expert_env_steps == steps
    assert np.all(loaded.counts >= 2) and np.all(loaded.counts <= 20)
    goals = loaded.tasks["goal"]
    assert goals.shape == (2, 2) and np.all(np.abs(goals) <= 0.5)
    assert loaded.expert_params["params"]["Dense_0"]["kernel"].shape == (2, 2, 8)
    # The seed decides the tasks: the same seed again gives the same goals.
    again = tmp_path / "again.npz"
    assert _cli("experts", "--env", "point-nav", "--out", str(again), "--seed", "4",
                *TINY).exit_code == 0
    np.testing.assert_array_equal(load_demonstrations(again, env).tasks["goal"], goals)


@pytest.mark.parametrize("args, expected", [
    (("--env", "no-such-env"), "env.name: unknown environment 'no-such-env'"),
    (("--env", "point-nav", "--set", "clip_epsilon=0.1"), "unknown key 'clip_epsilon'"),
    (("--env", "point-nav", "--set", "learning_rate=-1"), "learning_rate: -1.0 not allowed"),
    (("--env", "point-nav", "--set", "baseline=mlp"), "baseline: 'mlp' not allowed"),
    (("--env", "point-nav", "--set", "horizon=2", "--set", "episodes_per_iteration=1",
      "--set", "minibatches=4"), "minibatches: 4 not allowed"),
])
def test_cli_experts_rejects_bad_options_before_compiling(tmp_path, args, expected):
    out = tmp_path / "demos.npz"
    result = _cli("experts", *args, "--out", str(out), "--quiet")
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert expected in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_expert_config_defaults_match_the_brief():
    config = ExpertConfig()
    assert (config.num_tasks, config.iterations, config.episodes_per_iteration) == (40, 200, 10)
    assert config.hidden_sizes == (64, 64) and config.horizon is None
    assert (config.learning_rate, config.clip_eps, config.epochs, config.minibatches) == (
        3e-4, 0.2, 10, 4)
    assert (config.discount, config.gae_lambda, config.demos_per_task) == (0.99, 0.95, 10)
    assert dataclasses.replace(config, seed=3).seed == 3


# --- episodes that end and restart inside a lane -----------------------------------------


class _FourStepEpisodes(TaskEnv):
    """Every episode lasts exactly 4 steps (reward 1 each, observation the step count);
    a lane starts a fresh one at once."""

    name = "four-step-episodes"
    observation_size = 1
    action_size = 1
    horizon = 10
    task_distribution = "a single task"

    def sample_tasks(self, key, num_tasks):
        return {"goal": jnp.zeros((num_tasks, 1))}

    def reset(self, key, task):
        return EnvState(obs=jnp.zeros(1), reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=jnp.zeros(()))

    def step(self, state, action, task):
        count = state.physics + 1.0
        return EnvState(obs=count[None], reward=jnp.ones(()),
                        done=(count >= 4.0).astype(jnp.float32), physics=count)


def test_ppo_time_feature_and_returns_restart_with_every_episode():
    env = _FourStepEpisodes()
    config = ExpertConfig(num_tasks=2, iterations=2, episodes_per_iteration=2, horizon=10,
                          hidden_sizes=(4,), value_hidden_sizes=(4,), minibatches=2)
    ppo = PPO(env, expert_policy(env, config), config)
    state = ppo.init(jax.random.PRNGKey(0), 2)
    tasks = env.sample_tasks(jax.random.PRNGKey(1), 2)
    batch = collect(env, ppo.policy, state.params["policy"], tasks, jax.random.PRNGKey(2), 2,
                    10)
    value_params = jax.tree.map(lambda x: x[0], state.params["value"])
    _, time = ppo.values(value_params, batch.observations[0], batch.timesteps[0], 0.0, 1.0)
    # The value function's time feature is the step within the episode over H.
    np.testing.assert_allclose(np.asarray(time[0]),
                               np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]) / 10, atol=1e-6)
    # The reported return averages the episodes that ended (4 each), not whole lanes (10).
    _, info = train_experts(env, tasks, config, jax.random.PRNGKey(3))
    np.testing.assert_allclose(info["returns"], 4.0)
    np.testing.assert_allclose(info["task_returns"], 4.0)
