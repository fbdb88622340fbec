"""Environment rewards and dynamics against values computed by hand (the task tables of the README).

The Brax bodies are compiled once per module: one jitted program per environment that
resets, then scans a few fixed policy actions, returning everything the checks need.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax.envs import make_env
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import rollout_lane

# ---------------------------------------------------------------------------------------
# point-nav
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def point_nav():
    return make_env("point-nav")


def _dist(a, b):
    return float(np.sqrt(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_point_nav_reset(point_nav):
    state = point_nav.reset(jax.random.PRNGKey(3), {"goal": jnp.array([0.25, -0.1])})
    np.testing.assert_array_equal(np.asarray(state.obs), [0.0, 0.0])
    assert float(state.reward) == 0.0
    assert float(state.done) == 0.0
    assert point_nav.observation_size == 2 and point_nav.action_size == 2
    assert point_nav.horizon == 100


def test_point_nav_hand_driven_steps(point_nav):
    goal = np.array([0.25, -0.1])
    task = {"goal": jnp.asarray(goal, jnp.float32)}
    state = point_nav.reset(jax.random.PRNGKey(0), task)

    # (action, expected new position, expected reward, expected done)
    script = [
        # x clipped 1.0 -> 0.1, y inside the box; offset (-0.15, 0.05)
        ((1.0, -0.05), (0.1, -0.05), -np.sqrt(0.15 ** 2 + 0.05 ** 2), 0.0),
        # both clipped: (+0.1, -0.1); offset (-0.05, -0.05)
        ((0.3, -7.0), (0.2, -0.15), -np.sqrt(0.05 ** 2 + 0.05 ** 2), 0.0),
        # x lands on the goal, y still 0.05 off: not done (both coordinates needed)
        ((0.05, 0.0), (0.25, -0.15), -0.05, 0.0),
        # y moves to 0.005 of the goal, x 0.004: inside the 0.01 box -> done
        ((0.004, 0.055), (0.254, -0.095), -np.sqrt(0.004 ** 2 + 0.005 ** 2), 1.0),
    ]
    for action, position, reward, done in script:
        state = point_nav.step(state, jnp.asarray(action, jnp.float32), task)
        np.testing.assert_allclose(np.asarray(state.obs), position, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.physics), position, atol=1e-6)
        np.testing.assert_allclose(float(state.reward), reward, rtol=1e-5, atol=1e-6)
        # the reward is the distance of the NEW position to the goal
        np.testing.assert_allclose(float(state.reward), -_dist(position, goal), rtol=1e-5,
                                   atol=1e-6)
        assert float(state.done) == done


def test_point_nav_done_box_is_per_coordinate(point_nav):
    task = {"goal": jnp.array([0.0, 0.0])}
    state = point_nav.reset(jax.random.PRNGKey(0), task)
    # distance 0.0099*sqrt(2) = 0.014 > 0.01 but each coordinate < 0.01: done
    inside = point_nav.step(state, jnp.array([0.0099, -0.0099]), task)
    assert float(inside.done) == 1.0
    np.testing.assert_allclose(float(inside.reward), -0.0099 * np.sqrt(2.0), rtol=1e-5)
    # one coordinate just outside the box: not done
    outside = point_nav.step(state, jnp.array([0.0, 0.0101]), task)
    assert float(outside.done) == 0.0
    np.testing.assert_allclose(float(outside.reward), -0.0101, rtol=1e-5)


def test_point_nav_task_sampling(point_nav):
    goals = np.asarray(point_nav.sample_tasks(jax.random.PRNGKey(42), 2000)["goal"])
    assert goals.shape == (2000, 2)
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    # uniform spread: the extremes get near the bounds, mean ~0, std ~ 1/sqrt(12)
    assert goals.min(axis=0).max() < -0.49 and goals.max(axis=0).min() > 0.49
    np.testing.assert_allclose(goals.mean(axis=0), 0.0, atol=0.025)
    np.testing.assert_allclose(goals.std(axis=0), 1.0 / np.sqrt(12.0), atol=0.015)
    # each quarter of [-0.5, 0.5] holds about a quarter of the samples
    counts = np.histogram(goals[:, 0], bins=4, range=(-0.5, 0.5))[0]
    assert np.all(np.abs(counts - 500) < 80), counts
    # x and y are independent draws, not the same number
    assert abs(np.corrcoef(goals[:, 0], goals[:, 1])[0, 1]) < 0.1


def test_point_nav_rollout_masks_after_done(point_nav):
    horizon = 8
    policy = GaussianPolicy(2, 2, hidden_sizes=(8, 8))
    params = policy.init(jax.random.PRNGKey(0))
    inner = dict(params["params"])
    inner["Dense_2"] = {"kernel": jnp.zeros_like(inner["Dense_2"]["kernel"]),
                        "bias": jnp.array([10.0, -10.0])}
    inner["log_std"] = jnp.full((2,), -20.0)
    params = {"params": inner}
    goal = np.array([0.305, -0.295])
    task = {"goal": jnp.asarray(goal, jnp.float32)}

    traj = jax.jit(rollout_lane, static_argnums=(0, 1, 5))(
        point_nav, policy, params, task, jax.random.PRNGKey(1), horizon)

    # the walker moves (0.1, -0.1) per step: positions 0.1, 0.2, 0.3 -> inside the box at
    # the third step (index 2), where done fires
    expected_masks = [1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(np.asarray(traj.masks), expected_masks)
    expected_rewards = [-_dist([0.1, -0.1], goal), -_dist([0.2, -0.2], goal),
                        -_dist([0.3, -0.3], goal), 0, 0, 0, 0, 0]
    np.testing.assert_allclose(np.asarray(traj.rewards), expected_rewards, atol=1e-5)
    assert float(traj.rewards[2]) < -0.007  # the done step's own reward is kept
    # observations are the pre-step states; frozen at the last real position afterwards
    expected_obs = [[0, 0], [0.1, -0.1], [0.2, -0.2]] + [[0.3, -0.3]] * 5
    np.testing.assert_allclose(np.asarray(traj.observations), expected_obs, atol=1e-5)
    # the policy kept pushing (the actions are still the raw ~(10, -10)) but nothing moved
    np.testing.assert_allclose(np.asarray(traj.actions), np.tile([10.0, -10.0], (8, 1)),
                               atol=1e-4)
    np.testing.assert_allclose(float(traj.mean_episode_return()), sum(expected_rewards),
                               atol=1e-5)
    # the lane stays idle after the goal: one ended episode, no fresh one
    np.testing.assert_array_equal(np.asarray(traj.dones), [0, 0, 1, 0, 0, 0, 0, 0])
    assert float(traj.episode_count()) == 1.0


# ---------------------------------------------------------------------------------------
# Brax locomotion
# ---------------------------------------------------------------------------------------

# Raw policy actions in the ±10 box; the env receives clip(a / 10, -1, 1), so 7.0 -> 0.7,
# -15.0 -> -1 (clipped), 12.0 -> 1 (clipped), -3.0 -> -0.3.
_PATTERN = np.array([7.0, -15.0, 3.0, -3.0, 12.0, 0.5, -8.0, 20.0])
NUM_STEPS = 4


def _actions(action_size):
    rows = [np.roll(np.resize(_PATTERN, action_size), t) for t in range(NUM_STEPS)]
    return np.stack(rows).astype(np.float32)


def _env_action(raw):
    return np.clip(np.asarray(raw, np.float64) / 10.0, -1.0, 1.0)


def _run_brax(env, tasks, actions, compare_raw):
    """Jitted: reset, then scan `actions`; every task of the batch (leading axis) sees
    the same physics (the task only enters the reward), so `step` is vmapped over tasks
    with the state shared."""

    def program(key, tasks, actions):
        task0 = jax.tree.map(lambda leaf: leaf[0], tasks)
        state = env.reset(key, task0)

        def body(state, action):
            stepped = jax.vmap(env.step, in_axes=(None, None, 0))(state, action, tasks)
            out = dict(x_before=state.physics.pipeline_state.x.pos[0, 0],
                       x_after=stepped.physics.pipeline_state.x.pos[:, 0, 0],  # [tasks]
                       rewards=stepped.reward, done=stepped.done,
                       q=stepped.physics.pipeline_state.q,
                       qd=stepped.physics.pipeline_state.qd,
                       obs=stepped.obs,
                       x_velocity=stepped.physics.metrics["x_velocity"])
            if compare_raw:
                raw = env.brax_env.step(state.physics,
                                        jnp.clip(action / 10.0, -1.0, 1.0))
                out.update(raw_q=raw.pipeline_state.q, raw_qd=raw.pipeline_state.qd,
                           raw_obs=raw.obs)
            next_state = jax.tree.map(lambda leaf: leaf[0], stepped)
            return next_state, out

        return jax.lax.scan(body, state, actions)[1]

    out = jax.jit(program)(jax.random.PRNGKey(7), tasks, jnp.asarray(actions))
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def cheetah_dir():
    env = make_env("halfcheetah-dir")
    actions = _actions(env.action_size)
    tasks = {"direction": jnp.array([1.0, -1.0])}
    return env, tasks, actions, _run_brax(env, tasks, actions, compare_raw=True)


@pytest.fixture(scope="module")
def cheetah_vel():
    env = make_env("halfcheetah-vel")
    actions = _actions(env.action_size)
    tasks = {"velocity": jnp.array([0.0, 0.4, 1.7])}
    return env, tasks, actions, _run_brax(env, tasks, actions, compare_raw=False)


@pytest.fixture(scope="module")
def ant_dir():
    env = make_env("ant-dir")
    actions = _actions(env.action_size)
    tasks = {"direction": jnp.array([1.0, -1.0])}
    return env, tasks, actions, _run_brax(env, tasks, actions, compare_raw=True)


def _x_velocity(env, out):
    # x_after: [T, tasks] (identical across tasks, the physics ignores the task)
    x_after = out["x_after"].astype(np.float64)
    np.testing.assert_array_equal(x_after, x_after[:, :1] * np.ones_like(x_after))
    return (x_after[:, 0] - out["x_before"]) / float(env.brax_env.dt)


def _ctrl(actions):
    return np.sum(_env_action(actions) ** 2, axis=-1)


def test_brax_envs_take_their_default_backend_unless_one_is_named():
    from metarl_jax.envs.base import describe
    from metarl_jax.envs.locomotion import AntDirection

    env = make_env("halfcheetah-dir")
    assert env.backend == "generalized" and env.brax_env.backend == "generalized"
    assert (env.observation_size, env.action_size) == (17, 6)
    ant = make_env("ant-dir")
    assert ant.backend == "mjx" and ant.brax_env.backend == "mjx"
    assert (ant.observation_size, ant.action_size) == (27, 8)
    generalized_ant = make_env("ant-dir", backend="generalized")
    assert generalized_ant.brax_env.backend == "generalized"
    # `metarl envs` lists the class's default; a built env describes what it runs on.
    assert (describe(AntDirection)["backend"], ant.describe()["backend"],
            generalized_ant.describe()["backend"]) == ("mjx", "mjx", "generalized")


def test_halfcheetah_dir_reward(cheetah_dir):
    env, tasks, actions, out = cheetah_dir
    v = _x_velocity(env, out)  # [T]
    assert np.all(np.abs(v) > 1e-3)  # the body moves: the velocity term matters
    ctrl = _ctrl(actions)  # [T]
    # hand check of the first row: (0.7, -1, 0.3, -0.3, 1, 0.05)
    np.testing.assert_allclose(ctrl[0], 0.49 + 1 + 0.09 + 0.09 + 1 + 0.0025)
    for i, d in enumerate([1.0, -1.0]):
        expected = d * v - 0.05 * ctrl
        np.testing.assert_allclose(out["rewards"][:, i], expected, rtol=1e-4, atol=1e-4)
    # d flips the velocity term only: r(+1) - r(-1) = 2 v, r(+1) + r(-1) = -0.1 ||a||^2
    np.testing.assert_allclose(out["rewards"][:, 0] - out["rewards"][:, 1], 2 * v,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["rewards"][:, 0] + out["rewards"][:, 1], -0.1 * ctrl,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["done"], 0.0)


def test_halfcheetah_dir_passes_scaled_action_to_brax(cheetah_dir):
    _, _, _, out = cheetah_dir
    for ours, raw in (("q", "raw_q"), ("qd", "raw_qd"), ("obs", "raw_obs")):
        np.testing.assert_allclose(out[ours][:, 0], out[raw], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[ours][:, 1], out[raw], rtol=1e-5, atol=1e-5)


def test_halfcheetah_vel_reward(cheetah_vel):
    env, tasks, actions, out = cheetah_vel
    v = _x_velocity(env, out)
    ctrl = _ctrl(actions)
    np.testing.assert_allclose(out["x_velocity"][:, 0], v, rtol=1e-4, atol=1e-4)
    for i, target in enumerate([0.0, 0.4, 1.7]):
        expected = -np.abs(v - target) - 0.05 * ctrl
        np.testing.assert_allclose(out["rewards"][:, i], expected, rtol=1e-4, atol=1e-4)


def test_ant_dir_reward(ant_dir):
    env, tasks, actions, out = ant_dir
    v = _x_velocity(env, out)
    assert np.all(np.abs(v) > 1e-4)
    ctrl = _ctrl(actions)  # 8 dims: (0.7, -1, 0.3, -0.3, 1, 0.05, -0.8, 1) on row 0
    np.testing.assert_allclose(ctrl[0], 0.49 + 1 + 0.09 + 0.09 + 1 + 0.0025 + 0.64 + 1)
    for i, d in enumerate([1.0, -1.0]):
        # contact cost is 0 in Brax's ant; +1 survive bonus
        expected = d * v - 0.5 * ctrl + 1.0
        np.testing.assert_allclose(out["rewards"][:, i], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["done"], 0.0)  # healthy for these few steps


def test_ant_dir_passes_scaled_action_to_brax(ant_dir):
    _, _, _, out = ant_dir
    for ours, raw in (("q", "raw_q"), ("qd", "raw_qd"), ("obs", "raw_obs")):
        np.testing.assert_allclose(out[ours][:, 0], out[raw], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["halfcheetah-dir", "ant-dir"])
def test_direction_task_sampling(name):
    env = make_env(name)
    directions = np.asarray(env.sample_tasks(jax.random.PRNGKey(5), 400)["direction"])
    assert directions.shape == (400,)
    assert set(np.unique(directions).tolist()) == {-1.0, 1.0}
    assert 150 < np.sum(directions > 0) < 250  # fair coin


def test_velocity_task_sampling():
    env = make_env("halfcheetah-vel")
    velocities = np.asarray(env.sample_tasks(jax.random.PRNGKey(5), 2000)["velocity"])
    assert velocities.shape == (2000,)
    assert velocities.min() >= 0.0 and velocities.max() <= 2.0
    assert velocities.min() < 0.02 and velocities.max() > 1.98
    np.testing.assert_allclose(velocities.mean(), 1.0, atol=0.05)


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


def _task_classes():
    """Every concrete task distribution defined in the package's modules."""
    import inspect
    import pkgutil

    import metarl_jax.envs as package
    from metarl_jax.envs.base import TaskEnv

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = __import__(f"metarl_jax.envs.{info.name}", fromlist=["_"])
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, TaskEnv) and cls.__module__ == module.__name__
                    and not inspect.isabstract(cls) and "task_distribution" in vars(cls)):
                found.add(cls)
    return found


def test_every_task_class_is_registered_and_described_without_building(monkeypatch):
    from metarl_jax.envs import ENVIRONMENTS, describe_envs, env_names, locomotion

    assert set(ENVIRONMENTS.values()) == _task_classes()
    assert len(ENVIRONMENTS) == 14 and all(ENVIRONMENTS[n].name == n for n in ENVIRONMENTS)

    def no_model(*args):
        raise AssertionError("describe_envs built a Brax model")

    monkeypatch.setattr(locomotion, "_brax_env", no_model)
    rows = describe_envs()
    assert [r["name"] for r in rows] == env_names()
    assert {r["name"]: (r["observation_size"], r["action_size"], r["horizon"], r["body"])
            for r in rows}["ant-goal"] == (29, 8, 200, "ant")


def test_static_rows_equal_the_built_envs(cheetah_dir, ant_dir, point_nav):
    # test_task_suite.py checks the same for every Brax task it builds.
    from metarl_jax.envs import ENVIRONMENTS, describe

    for env in (cheetah_dir[0], ant_dir[0], point_nav):
        assert describe(ENVIRONMENTS[env.name]) == env.describe()


def test_a_brax_task_checks_its_declared_sizes_when_built(cheetah_dir):
    from metarl_jax.envs.locomotion import HalfCheetahDirection

    class Misdeclared(HalfCheetahDirection):
        observation_size = 18

    with pytest.raises(TypeError, match="declares observation_size 18, but Brax's "
                                        r"halfcheetah \(generalized\) has 17"):
        Misdeclared()


def test_register_task_refuses_incomplete_or_clashing_definitions(monkeypatch):
    from metarl_jax.envs import ENVIRONMENTS, register_task
    from metarl_jax.envs.point_nav import PointNav

    monkeypatch.setattr("metarl_jax.envs.registry.ENVIRONMENTS", dict(ENVIRONMENTS))

    class Undeclared(PointNav):
        observation_size = None

    with pytest.raises(TypeError, match="must declare observation_size"):
        register_task("undeclared")(Undeclared)
    with pytest.raises(ValueError, match="already registered by metarl_jax.envs.point_nav"):
        register_task("point-nav")(type("Other", (PointNav,), {}))
    with pytest.raises(ValueError, match="reads as an import path"):
        register_task("my:task")(type("Other", (PointNav,), {}))
    with pytest.raises(TypeError, match="is not a TaskEnv subclass"):
        register_task("thing")(object)
    register_task("point-nav-copy")(type("Copy", (PointNav,), {}))
    from metarl_jax.envs import registry

    assert "point-nav-copy" in registry.ENVIRONMENTS and "point-nav-copy" not in ENVIRONMENTS


def test_one_list_of_brax_backends():
    from metarl_jax.config import BRAX_BACKENDS, ConfigError, EnvConfig, build_dataclass
    from metarl_jax.envs import locomotion

    assert locomotion.BRAX_BACKENDS is BRAX_BACKENDS
    # No backend named: the task's own default, filled in when a config is resolved;
    # a Brax task that declares none takes the first.
    assert EnvConfig().backend is None and BRAX_BACKENDS[0] == "generalized"
    assert locomotion.BraxTaskEnv.default_backend == BRAX_BACKENDS[0]
    with pytest.raises(ConfigError, match="env.backend: 'warp' not allowed; expected one of "
                                          + ", ".join(BRAX_BACKENDS)):
        build_dataclass(EnvConfig, {"backend": "warp"}, "env.")


def test_environments_doc_lists_every_task_with_its_sizes():
    import pathlib
    import re

    from metarl_jax.config import BRAX_BACKENDS
    from metarl_jax.envs import describe_envs

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "environments.md").read_text()
    documented = {m[0]: tuple(map(int, m[1:])) for m in re.findall(
        r"^\| `([a-z0-9-]+)` \| (\d+) \| (\d+) \| (\d+) \|", text, flags=re.M)}
    assert documented == {r["name"]: (r["observation_size"], r["action_size"], r["horizon"])
                          for r in describe_envs()}
    assert all(f"`{backend}`" in text for backend in BRAX_BACKENDS)


def test_halfcheetah_physics_check_measures_heights_as_brax_does():
    """experiments/halfcheetah_physics.py reads geom heights from MuJoCo's kinematics of
    an observation; Brax's own contact distances on the model with every geom colliding
    give the same lowest points, and Brax's stock model collides exactly the geoms the
    script names as colliding."""
    import pathlib
    import sys

    from brax import contact, kinematics
    from brax.io import mjcf

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
    import halfcheetah_physics  # noqa: E402  (a script, not a package)

    full = mjcf.loads(halfcheetah_physics.model_xml(full_contact=True))
    stock = mjcf.loads(halfcheetah_physics.model_xml(full_contact=False))
    # A crouched, pitched posture with the torso low: some geoms below the floor.
    q = np.asarray(full.init_q).copy()
    q[1:] = [-0.55, 0.4, 0.9, -0.7, 0.5, -0.8, 0.6, -0.4]
    observation = np.concatenate([q[1:], np.zeros(full.qd_size())])
    heights, names = halfcheetah_physics.lowest_points(observation[None])

    def floor_distances(system):
        # Brax makes two contacts per capsule and the floor (its end spheres), in geom
        # order; a contact's distance is its sphere's height above the floor.
        x, _ = kinematics.forward(system, jnp.asarray(q), jnp.zeros(system.qd_size()))
        return np.asarray(contact.get(system, x).dist).reshape(-1, 2).min(axis=1)

    brax_lowest = floor_distances(full)
    np.testing.assert_allclose(heights[0], brax_lowest, atol=1e-5)
    assert (heights[0] < 0).any() and (heights[0] > 0).any()

    colliding = sorted(names.index(g) for g in halfcheetah_physics.COLLIDING)
    np.testing.assert_allclose(floor_distances(stock), heights[0][colliding], atol=1e-5)
