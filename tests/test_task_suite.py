"""The task suite beyond the core four: rewards of hand-driven steps
against the formula computed from the Brax state, task sampling against its
distribution, per-task physics, and what a lane does when its body falls.

Tasks sharing a body run in one compiled program: the physics of every task of a group
is the same (the task only enters the reward), so the program steps the first task's
environment and evaluates each other task's reward on the same transition.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl_jax.algorithms.common import sample_adaptation_phases
from metarl_jax.algorithms.promp import ProMP, ProMPConfig
from metarl_jax.envs import ENVIRONMENTS, PhysicsParameters, describe, env_names, make_env
from metarl_jax.envs.locomotion import ring_goals
from metarl_jax.policies import GaussianPolicy
from metarl_jax.advantages import discounted_returns
from metarl_jax.rollout import collect

NUM_STEPS = 5
# Raw policy actions in the ±10 box; the environment receives clip(a / 10, -1, 1).
_PATTERN = np.array([7.0, -15.0, 3.0, -3.0, 12.0, 0.5, -8.0, 20.0, -6.0])


def _actions(action_size, num_steps=NUM_STEPS):
    rows = [np.roll(np.resize(_PATTERN, action_size), t) for t in range(num_steps)]
    return np.stack(rows).astype(np.float32)


def _env_action(raw):
    return np.clip(np.asarray(raw, np.float64) / 10.0, -1.0, 1.0)


def _ctrl(actions):
    return np.sum(_env_action(actions) ** 2, axis=-1)


def _drive(env, tasks, actions, others=()):
    """Resets every task from one key and steps it through `actions` (jitted).

    Returns per step and task the rewards, dones, link positions and rotations, and, for
    each `(other_env, other_tasks)`, the other environment's rewards of the first task's
    transitions.
    """

    def program(key, tasks, actions, other_tasks):
        def one_task(task):
            state = env.reset(key, task)

            def body(state, action):
                next_state = env.step(state, action, task)
                x = next_state.physics.pipeline_state.x
                out = dict(reward=next_state.reward, done=next_state.done, pos=x.pos,
                           rot=x.rot, q=next_state.physics.pipeline_state.q,
                           metrics=next_state.physics.metrics)
                return next_state, out

            first = state.physics.pipeline_state.x
            return first.pos, first.rot, jax.lax.scan(body, state, actions)[1]

        start_pos, start_rot, out = jax.vmap(one_task)(tasks)
        metrics0 = jax.tree.map(lambda m: m[0], out["metrics"])  # task 0: [T]
        env_actions = jnp.clip(actions / 10.0, -1.0, 1.0)
        other_rewards = []
        for (other, _), tasks_of_other in zip(others, other_tasks):
            per_step = jax.vmap(other.task_reward, in_axes=(0, 0, None))
            per_task = jax.vmap(per_step, in_axes=(None, None, 0))
            other_rewards.append(per_task(metrics0, env_actions, tasks_of_other))
        return start_pos, start_rot, out, other_rewards

    start_pos, start_rot, out, other_rewards = jax.jit(program)(
        jax.random.PRNGKey(3), tasks, jnp.asarray(actions),
        [other_tasks for _, other_tasks in others])
    to_np = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    return dict(start_pos=to_np(start_pos), start_rot=to_np(start_rot), **to_np(out),
                others=[to_np(r) for r in other_rewards])


def _torso_positions(run):
    """Torso position per task, before and after each step: [tasks, T+1, 3]."""
    return np.concatenate([run["start_pos"][:, None, 0], run["pos"][:, :, 0]], axis=1)


def _rotate(vector, quaternion):
    w, u = quaternion[..., :1], quaternion[..., 1:]
    t = 2.0 * np.cross(u, vector)
    return vector + w * t + np.cross(u, t)


# ---------------------------------------------------------------------------------------
# Ant: direction in the plane, goals in the disc and on the ring
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ant_dir2d():
    env = make_env("ant-dir2d")
    directions = np.array([[1.0, 0.0], [0.6, -0.8], [-math.sqrt(0.5), math.sqrt(0.5)]])
    actions = _actions(env.action_size)
    return env, directions, actions, _drive(env, {"direction": jnp.asarray(directions,
                                                                            jnp.float32)},
                                            actions)


def test_ant_dir2d_reward(ant_dir2d):
    env, directions, actions, run = ant_dir2d
    torso = _torso_positions(run)[0]
    velocity = (torso[1:, :2] - torso[:-1, :2]) / float(env.brax_env.dt)  # [T, 2]
    assert np.all(np.abs(velocity) > 1e-4)  # both components matter
    for i, u in enumerate(directions):
        # contact cost 0 in Brax's ant, survive bonus 1
        expected = velocity @ u - 0.5 * _ctrl(actions) + 1.0
        np.testing.assert_allclose(run["reward"][i], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(run["done"], 0.0)


@pytest.fixture(scope="module")
def ant_goals():
    # On `generalized`, where the ant moves less than 0.15 in these few steps, so that
    # which goals lie inside the sparse reward's disc is known (the GMPS ring's physics).
    goal_env = make_env("ant-goal", backend="generalized")
    ring = make_env("ant-goal-ring", backend="generalized")
    sparse = make_env("ant-goal-ring-sparse", backend="generalized")
    goals = np.array([[1.0, -2.0], [0.0, 0.0], [-0.5, 0.25]], np.float32)
    # The ring goals: one the ant cannot reach in a few steps, and, for the sparse reward,
    # off-ring goals on either side of the 0.8 radius around the start.
    ring_goal_set = np.array([[2.0, 0.0], [0.3, 0.0], [0.0, 0.95], [0.1, 0.1]], np.float32)
    actions = _actions(goal_env.action_size)
    run = _drive(goal_env, {"goal": jnp.asarray(goals)}, actions,
                 others=[(ring, {"goal": jnp.asarray(ring_goal_set)}),
                         (sparse, {"goal": jnp.asarray(ring_goal_set)})])
    return goal_env, goals, ring_goal_set, actions, run


def test_goal_ants_observe_their_position(ant_goals):
    goal_env = ant_goals[0]
    assert goal_env.observation_size == make_env("ant-dir").observation_size + 2
    assert make_env("ant-goal-ring").observation_size == goal_env.observation_size


def test_ant_goal_reward(ant_goals):
    env, goals, _, actions, run = ant_goals
    xy = _torso_positions(run)[0, 1:, :2]  # after each step
    assert np.all(np.abs(xy) > 1e-4)
    for i, goal in enumerate(goals):
        expected = -np.abs(xy - goal).sum(-1) - 0.1 * _ctrl(actions)
        np.testing.assert_allclose(run["reward"][i], expected, rtol=1e-4, atol=1e-4)


def test_ant_goal_ring_dense_and_sparse_rewards(ant_goals):
    # The reward formula on given environment actions (here the ±10-scaled ones the
    # program stepped with); `test_ant_ring_steps_in_its_own_unit_box` drives the ring.
    _, _, ring_goal_set, actions, run = ant_goals
    dense, sparse = run["others"]
    xy = _torso_positions(run)[0, 1:, :2]
    # control cost 0.005||a||^2 on the ±1 environment action, survive bonus 0.05
    rest = 0.05 - 0.005 * _ctrl(actions)
    for i, goal in enumerate(ring_goal_set):
        expected_dense = -np.abs(xy - goal).sum(-1) + 4.0 + rest
        np.testing.assert_allclose(dense[i], expected_dense, rtol=1e-4, atol=1e-4)
        inside = np.linalg.norm(xy - goal, axis=-1) <= 0.8
        expected_sparse = np.where(inside, expected_dense, -np.abs(goal).sum() + 4.0 + rest)
        np.testing.assert_allclose(sparse[i], expected_sparse, rtol=1e-4, atol=1e-4)
    # The ant stays within 0.15 of the origin (reset noise and a few steps): the far goals
    # are outside the 0.8 disc on every step, where the goal term is the constant
    # -||g||_1 + 4 ...
    assert np.all(np.linalg.norm(xy, axis=-1) < 0.15)
    np.testing.assert_allclose(sparse[0] - rest, 2.0, atol=1e-5)
    np.testing.assert_allclose(sparse[2] - rest, -0.95 + 4.0, atol=1e-5)
    # ... while the near goals are inside it, where sparse equals dense.
    np.testing.assert_allclose(sparse[1], dense[1], atol=1e-6)
    np.testing.assert_allclose(sparse[3], dense[3], atol=1e-6)
    assert np.ptp(sparse[3]) > 1e-4  # and the dense term moves with the ant


@pytest.fixture(scope="module")
def ant_ring():
    """The dense ring driven by raw actions of up to ±2.5 (the ring's box is ±1), and
    steps from torso heights inside and outside [0.2, 1.0], on `generalized` (the GMPS
    ring's physics)."""
    ring = make_env("ant-goal-ring", backend="generalized")
    goals = np.array([[2.0, 0.0], [0.1, 0.1]], np.float32)
    actions = _actions(ring.action_size) / 8.0
    run = _drive(ring, {"goal": jnp.asarray(goals)}, actions)

    @jax.jit
    def from_height(key, heights):
        task = {"goal": jnp.asarray(goals[0])}

        def one(height):
            state = ring.reset(key, task)
            pipeline = state.physics.pipeline_state
            pipeline = pipeline.replace(q=pipeline.q.at[2].set(height))
            state = state.replace(physics=state.physics.replace(pipeline_state=pipeline))
            stepped = ring.step(state, jnp.zeros(ring.action_size), task)
            return stepped.done, stepped.physics.pipeline_state.x.pos[0], stepped.obs

        return jax.vmap(one)(heights)

    heights = jnp.array([0.75, 1.3])
    dones, torso, obs = jax.device_get(from_height(jax.random.PRNGKey(3), heights))
    return ring, goals, actions, run, dict(dones=dones, torso=torso, obs=obs)


def test_ant_ring_steps_in_its_own_unit_box(ant_ring):
    ring, goals, actions, run, _ = ant_ring
    assert ring.action_scale == 1.0 and ring.raw_action_bound() == 1.0
    assert make_env("ant-goal-ring-sparse").raw_action_bound() == 1.0
    assert make_env("ant-goal").raw_action_bound() == 10.0  # ProMP's tasks keep ±10
    env_actions = np.clip(actions, -1.0, 1.0)
    assert np.any(np.abs(actions) > 1.0) and np.any(np.abs(actions) < 1.0)
    xy = _torso_positions(run)[0, 1:, :2]
    assert np.all(np.abs(xy) > 1e-4)
    for i, goal in enumerate(goals):
        expected = (-np.abs(xy - goal).sum(-1) + 4.0
                    - 0.005 * np.sum(env_actions ** 2, axis=-1) + 0.05)
        np.testing.assert_allclose(run["reward"][i], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(run["done"], 0.0)
    # The simulator received the clipped action: the same physics as a ±1 drive.
    clipped = _drive(ring, {"goal": jnp.asarray(goals)}, env_actions)
    np.testing.assert_allclose(clipped["pos"], run["pos"], atol=1e-5)


def test_ant_ring_terminates_outside_the_torso_height_range(ant_ring):
    ring, *_, from_heights = ant_ring
    # Brax's ant checks the torso height after every step against the range it was
    # built with; the ring pins it rather than relying on Brax's default.
    assert ring.brax_env._healthy_z_range == (0.2, 1.0)
    assert ring.brax_env._terminate_when_unhealthy
    z = from_heights["torso"][:, 2]
    assert 0.2 <= z[0] <= 1.0 and z[1] > 1.0  # (contacts push a sunken torso up at once)
    np.testing.assert_array_equal(from_heights["dones"], [0.0, 1.0])
    # The observation starts with the torso's x, y, z (positions included).
    np.testing.assert_allclose(from_heights["obs"][:, :3], from_heights["torso"], atol=1e-5)


def test_ring_goals_and_sampling():
    goals = np.asarray(ring_goals())
    assert goals.shape == (40, 2)
    np.testing.assert_allclose(np.linalg.norm(goals, axis=-1), 2.0, atol=1e-6)
    angles = np.arctan2(goals[:, 1], goals[:, 0])
    np.testing.assert_allclose(angles, np.linspace(0, np.pi / 2, 40), atol=1e-6)
    for name in ("ant-goal-ring", "ant-goal-ring-sparse"):
        env = make_env(name)
        np.testing.assert_array_equal(np.asarray(env.task_set()["goal"]), goals)
        sampled = np.asarray(env.sample_tasks(jax.random.PRNGKey(0), 4000)["goal"])
        index = np.argmin(np.linalg.norm(sampled[:, None] - goals[None], axis=-1), axis=1)
        np.testing.assert_allclose(sampled, goals[index], atol=1e-6)  # only ring goals
        counts = np.bincount(index, minlength=40)
        assert counts.min() > 60 and counts.max() < 145  # 100 expected each
    assert make_env("ant-goal").task_set() is None


def test_ant_goal_sampling_is_uniform_on_the_disc():
    goals = np.asarray(make_env("ant-goal").sample_tasks(jax.random.PRNGKey(1),
                                                         20000)["goal"])
    radius = np.linalg.norm(goals, axis=-1)
    assert radius.max() <= 3.0 + 1e-5 and radius.max() > 2.99
    # uniform on the disc: P(r < 1.5) = 1/4, and the angle is uniform
    np.testing.assert_allclose(np.mean(radius < 1.5), 0.25, atol=0.015)
    angle = np.arctan2(goals[:, 1], goals[:, 0])
    np.testing.assert_allclose(np.histogram(angle, 8)[0] / 20000, 1 / 8, atol=0.015)


@pytest.mark.parametrize("name", ["ant-dir2d", "humanoid-dir2d"])
def test_planar_directions_are_unit_and_uniform(name):
    directions = np.asarray(make_env(name).sample_tasks(jax.random.PRNGKey(2),
                                                        20000)["direction"])
    np.testing.assert_allclose(np.linalg.norm(directions, axis=-1), 1.0, atol=1e-5)
    angle = np.arctan2(directions[:, 1], directions[:, 0])
    np.testing.assert_allclose(np.histogram(angle, 8)[0] / 20000, 1 / 8, atol=0.015)


# ---------------------------------------------------------------------------------------
# Walker: direction and velocity
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def walker():
    env = make_env("walker-dir")
    vel = make_env("walker-vel")
    actions = _actions(env.action_size)
    run = _drive(env, {"direction": jnp.array([1.0, -1.0])}, actions,
                 others=[(vel, {"velocity": jnp.array([0.0, 3.0, 9.5])})])
    return env, actions, run


def test_walker_dir_and_vel_rewards(walker):
    env, actions, run = walker
    torso = _torso_positions(run)
    np.testing.assert_array_equal(torso[0], torso[1])  # the task leaves the physics alone
    v = (torso[0, 1:, 0] - torso[0, :-1, 0]) / float(env.brax_env.dt)
    assert np.all(np.abs(v) > 1e-3)
    ctrl = 1e-3 * _ctrl(actions)
    for i, d in enumerate([1.0, -1.0]):
        np.testing.assert_allclose(run["reward"][i], d * v + 1.0 - ctrl, rtol=1e-4,
                                   atol=1e-4)
    (vel_rewards,) = run["others"]
    for i, target in enumerate([0.0, 3.0, 9.5]):
        np.testing.assert_allclose(vel_rewards[i], -np.abs(v - target) + 15.0 - ctrl,
                                   rtol=1e-4, atol=1e-4)


def test_walker_vel_sampling():
    velocities = np.asarray(make_env("walker-vel").sample_tasks(jax.random.PRNGKey(3),
                                                                4000)["velocity"])
    assert velocities.min() >= 0.0 and velocities.max() <= 10.0
    assert velocities.min() < 0.02 and velocities.max() > 9.98
    np.testing.assert_allclose(velocities.mean(), 5.0, atol=0.15)


# ---------------------------------------------------------------------------------------
# Humanoid: direction-weighted centre-of-mass velocity
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def humanoid():
    env = make_env("humanoid-dir")
    planar = make_env("humanoid-dir2d")
    actions = _actions(env.action_size)
    directions = np.array([[0.0, 1.0], [0.8, 0.6]], np.float32)
    run = _drive(env, {"direction": jnp.array([1.0, -1.0])}, actions,
                 others=[(planar, {"direction": jnp.asarray(directions)})])
    return env, directions, actions, run


def _centre_of_mass(env, pos, rot):
    inertia = env.brax_env.sys.link.inertia
    mass = np.asarray(inertia.mass, np.float64)
    offset = np.asarray(inertia.transform.pos, np.float64)
    body_points = pos + _rotate(offset, rot)  # [..., links, 3]
    return np.sum(mass[:, None] * body_points, axis=-2) / mass.sum()


def test_humanoid_rewards(humanoid):
    env, directions, actions, run = humanoid
    pos = np.concatenate([run["start_pos"][0][None], run["pos"][0]])
    rot = np.concatenate([run["start_rot"][0][None], run["rot"][0]])
    com = _centre_of_mass(env, pos, rot)  # [T+1, 3]
    velocity = (com[1:] - com[:-1]) / float(env.brax_env.dt)
    assert np.all(np.abs(velocity[:, :2]) > 1e-4)
    # Brax's humanoid maps the ±1 action onto the actuators' control range; the control
    # cost is on that command.
    ctrl_range = np.asarray(env.brax_env.sys.actuator.ctrl_range, np.float64)
    low, high = ctrl_range[:, 0], ctrl_range[:, 1]
    command = (_env_action(actions) + 1.0) * (high - low) * 0.5 + low
    ctrl = 0.1 * np.sum(command ** 2, axis=-1)
    for i, d in enumerate([1.0, -1.0]):
        expected = 1.25 * d * velocity[:, 0] - ctrl + 5.0
        np.testing.assert_allclose(run["reward"][i], expected, rtol=1e-3, atol=1e-3)
    (planar_rewards,) = run["others"]
    for i, u in enumerate(directions):
        expected = 1.25 * velocity[:, :2] @ u - ctrl + 5.0
        np.testing.assert_allclose(planar_rewards[i], expected, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Physics-parameter tasks
# ---------------------------------------------------------------------------------------

def _unit_scales(env):
    one = env.sample_tasks(jax.random.PRNGKey(0), 1)
    return jax.tree.map(jnp.ones_like, one)


@pytest.fixture(scope="module", params=["hopper-params", "walker-params"])
def params_run(request):
    env = make_env(request.param)
    drawn = env.sample_tasks(jax.random.PRNGKey(11), 2)
    unit = _unit_scales(env)
    # tasks: a draw, another draw, the first again, and the stock physics
    tasks = jax.tree.map(lambda d, u: jnp.concatenate([d, d[:1], u]), drawn, unit)
    actions = _actions(env.action_size)
    return env, tasks, actions, _drive(env, tasks, actions)


def test_params_tasks_differ_and_repeat_exactly(params_run):
    env, tasks, actions, run = params_run
    q = run["q"]  # [tasks, T, q]
    assert np.max(np.abs(q[0] - q[1])) > 1e-3  # different physics, different motion
    np.testing.assert_array_equal(q[0], q[2])  # the same task twice: bit-identical
    np.testing.assert_array_equal(run["reward"][0], run["reward"][2])


def test_params_unit_scales_reproduce_the_stock_body(params_run):
    env, tasks, actions, run = params_run

    def stock(key, actions):
        state = env.brax_env.reset(key)

        def body(state, action):
            state = env.brax_env.step(state, jnp.clip(action / 10.0, -1.0, 1.0))
            return state, state.pipeline_state.q

        return jax.lax.scan(body, state, actions)[1]

    stock_q = jax.jit(stock)(jax.random.PRNGKey(3), jnp.asarray(actions))
    np.testing.assert_allclose(run["q"][3], np.asarray(stock_q), rtol=1e-5, atol=1e-5)


def test_params_reward(params_run):
    env, tasks, actions, run = params_run
    torso = _torso_positions(run)
    v = (torso[:, 1:, 0] - torso[:, :-1, 0]) / float(env.brax_env.dt)  # [tasks, T]
    expected = v + 1.0 - 1e-3 * _ctrl(actions)[None]
    np.testing.assert_allclose(run["reward"], expected, rtol=1e-4, atol=1e-4)


def test_params_system_carries_the_scales():
    env = make_env("hopper-params")
    task = jax.tree.map(lambda x: x[0], env.sample_tasks(jax.random.PRNGKey(4), 1))
    base, sys = env.brax_env.sys, env.system(task)
    mass = np.asarray(task["mass_scale"]) * np.asarray(base.link.inertia.mass)
    np.testing.assert_allclose(np.asarray(sys.link.inertia.mass), mass, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sys.body_mass[1:]), mass, rtol=1e-6)
    diagonal = np.diagonal(np.asarray(sys.link.inertia.i), axis1=1, axis2=2)
    np.testing.assert_allclose(
        diagonal, np.diagonal(np.asarray(base.link.inertia.i), axis1=1, axis2=2)
        * np.asarray(task["inertia_scale"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sys.dof.damping),
                               np.asarray(base.dof.damping) * np.asarray(task["damping_scale"]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sys.geom_friction),
                               np.asarray(base.geom_friction)
                               * np.asarray(task["friction_scale"]), rtol=1e-6)


@pytest.mark.parametrize("name", ["hopper-params", "walker-params"])
def test_params_sampling_ranges(name):
    env = make_env(name)
    tasks = env.sample_tasks(jax.random.PRNGKey(5), 3000)
    for field, base in (("mass_scale", 1.5), ("inertia_scale", 1.5),
                        ("damping_scale", 1.3), ("friction_scale", 1.5)):
        exponent = np.log(np.asarray(tasks[field])) / np.log(base)
        assert exponent.shape[0] == 3000
        assert exponent.min() >= -3.0 - 1e-4 and exponent.max() <= 3.0 + 1e-4
        assert exponent.min() < -2.95 and exponent.max() > 2.95
        np.testing.assert_allclose(exponent.mean(), 0.0, atol=0.05)
        np.testing.assert_allclose(exponent.std(), 6 / math.sqrt(12), atol=0.05)
    assert isinstance(env, PhysicsParameters)


def test_new_physics_never_retraces():
    env = make_env("hopper-params")
    traces = []

    @jax.jit
    def first_reward(key, tasks):
        traces.append(1)
        def one(task):
            state = env.reset(key, task)
            return env.step(state, jnp.ones(env.action_size), task).reward
        return jax.vmap(one)(tasks)

    for seed in range(3):
        tasks = env.sample_tasks(jax.random.PRNGKey(seed), 4)
        jax.block_until_ready(first_reward(jax.random.PRNGKey(0), tasks))
    assert len(traces) == 1 and first_reward._cache_size() == 1


# ---------------------------------------------------------------------------------------
# Termination
# ---------------------------------------------------------------------------------------

def test_a_fallen_lane_continues_with_a_fresh_episode_and_its_returns_restart():
    env = make_env("hopper-params")
    policy = GaussianPolicy(env.observation_size, env.action_size, (4,))
    params = policy.init(jax.random.PRNGKey(0))
    inner = jax.tree.map(jnp.zeros_like, params["params"])
    # a deterministic policy pushing every joint hard one way: the hopper falls over,
    # and every fresh episode falls again
    inner["log_std"] = jnp.full((env.action_size,), -20.0)
    last_layer = max(k for k in inner if k != "log_std")
    inner[last_layer]["bias"] = jnp.array([10.0, -10.0, 10.0])
    horizon, tasks, lanes = 80, 2, 3
    batch = jax.jit(collect, static_argnums=(0, 1, 5, 6, 7))(
        env, policy, {"params": inner}, jax.tree.map(lambda x: jnp.repeat(x, tasks, axis=0), _unit_scales(env)),
        jax.random.PRNGKey(1), lanes, horizon, False)
    # the phase spends its whole budget on real transitions, over more episodes than lanes
    assert float(jnp.sum(batch.masks)) == tasks * lanes * horizon
    assert float(batch.episode_count()) > tasks * lanes
    traj = jax.tree.map(lambda x: x[0, 0], batch)
    masks, dones = np.asarray(traj.masks), np.asarray(traj.dones)
    rewards, timesteps = np.asarray(traj.rewards), np.asarray(traj.timesteps)
    observations = np.asarray(traj.observations)
    # every step of the lane is a real transition; the body fell more than once
    np.testing.assert_array_equal(masks, 1.0)
    ends = np.flatnonzero(dones)
    assert len(ends) >= 2 and ends[0] > 1
    first_end = int(ends[0])
    # the step after the fall starts a new episode: its clock restarts at 0 and its
    # state is a fresh start (near the initial pose), not the fallen body
    starts = np.concatenate([[0], ends[:-1] + 1])
    expected_clock = np.concatenate([np.arange(e - s + 1) for s, e in zip(starts, ends)]
                                    + [np.arange(horizon - ends[-1] - 1)])
    np.testing.assert_array_equal(timesteps, expected_clock)
    fresh_gap = np.abs(observations[first_end + 1] - observations[0]).max()
    fallen_gap = np.abs(observations[first_end] - observations[0]).max()
    assert fresh_gap < 0.05 < fallen_gap
    # discounted returns restart at the boundary
    returns = np.asarray(discounted_returns(traj.rewards, traj.masks, 0.99, traj.dones))
    # (float32: the within-episode sum is a difference of lane sums, ~1e-5 apart)
    np.testing.assert_allclose(returns[first_end], rewards[first_end], atol=1e-4)
    np.testing.assert_allclose(
        returns[0], np.sum(0.99 ** np.arange(first_end + 1) * rewards[:first_end + 1]),
        atol=1e-4)
    # the episode return averages the episodes that ended inside the lane
    ended_returns = [rewards[s:e + 1].sum() for s, e in zip(starts, ends)]
    np.testing.assert_allclose(float(traj.mean_episode_return()), np.mean(ended_returns),
                               rtol=1e-5)
    assert float(traj.episode_count()) == len(ends)


# ---------------------------------------------------------------------------------------
# One ProMP meta-iteration on every task
# ---------------------------------------------------------------------------------------

BRAX_TASKS = [name for name in env_names() if name != "point-nav"]
# One compiled iteration per body and default backend (ant-dir's, on mjx, runs through
# the CLI instead, test_cli.py, with the same checks; the ant ring's here is on
# generalized); the other tasks share one of these, and their steps are compiled by the
# reward tests above, so their iteration is traced, not compiled. The humanoid's takes
# about a minute to compile on two cores: `make test` traces it, `make test-slow`
# compiles it.
COMPILED_HERE = ["ant-goal-ring", "halfcheetah-vel", "hopper-params", "walker-dir"]
COMPILED_IN_SLOW_TESTS = ["humanoid-dir"]


def _tiny_promp(name):
    env = make_env(name, horizon=6)
    # The `metarl envs` row, read from the class without building, is the built env's.
    declared = ENVIRONMENTS[name]
    assert describe(declared) == {**env.describe(), "horizon": declared.horizon}
    config = ProMPConfig(meta_batch_size=2, episodes_per_task=2, horizon=6, promp_steps=1)
    policy = GaussianPolicy(env.observation_size, env.action_size, (8,))
    algorithm = ProMP(config, env, policy)
    assert algorithm.env_steps_per_iteration == 2 * 2 * 6 * 2
    return algorithm, algorithm.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", COMPILED_HERE + [pytest.param(name, marks=pytest.mark.slow)
                                                  for name in COMPILED_IN_SLOW_TESTS])
def test_one_promp_iteration_on_every_body(name):
    """Tiny batch, one compiled meta-iteration: finite, and every parameter moves."""
    algorithm, state = _tiny_promp(name)
    new_state, metrics = jax.jit(algorithm.meta_iteration)(state)
    metrics = jax.tree.map(np.asarray, metrics)
    for key in ("pre_return", "post_return", "outer_loss"):
        assert np.isfinite(metrics[key]), (key, metrics[key])
    assert abs(float(metrics["outer_loss_first"])) < 1e-4  # ratio 1 at the first step
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params,
                         new_state.params)
    assert min(jax.tree.leaves(moved)) > 0.0


@pytest.mark.parametrize("name", [n for n in BRAX_TASKS
                                  if n not in COMPILED_HERE and n != "ant-dir"])
def test_one_promp_iteration_traces_on_every_other_task(name):
    """The iteration of every other task traces to the state it started from, with
    finite-typed metrics, without compiling."""
    algorithm, state = _tiny_promp(name)
    after, metrics = jax.eval_shape(algorithm.meta_iteration, state)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
        assert (np.shape(x), jnp.result_type(x)) == (y.shape, y.dtype)
    for key in ("pre_return", "post_return", "outer_loss"):
        assert metrics[key].shape == () and metrics[key].dtype == jnp.float32, key


def test_every_body_is_compiled_here_or_through_the_cli():
    bodies = {ENVIRONMENTS[name].brax_name for name in BRAX_TASKS}
    compiled = COMPILED_HERE + COMPILED_IN_SLOW_TESTS + ["ant-dir"]
    assert {ENVIRONMENTS[name].brax_name for name in compiled} == bodies


def test_more_training_tasks_than_the_ring_has_fail_with_one_line(tmp_path):
    from click.testing import CliRunner

    from metarl_jax.cli import EXIT_CONFIG_ERROR, main

    result = CliRunner().invoke(main, ["experts", "--env", "ant-goal-ring", "--tasks", "41",
                                       "--out", str(tmp_path / "d.npz")])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "num_tasks: ant-goal-ring has 40 tasks; expected at most 40" in result.output
    result = CliRunner().invoke(main, ["train", "--algo", "gmps", "--env", "ant-goal-ring",
                                       "--set", "gmps.num_train_tasks=50",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "gmps.num_train_tasks: ant-goal-ring has 40 tasks" in result.output
    from metarl_jax.config import ConfigError
    with pytest.raises(ConfigError, match="num_tasks: ant-goal-ring has 40 tasks"):
        make_env("ant-goal-ring").training_tasks(jax.random.PRNGKey(0), 41)


def test_sparse_ring_trains_from_dense_ring_demonstrations(tmp_path):
    from metarl_jax.config import ConfigError
    from metarl_jax.demonstrations import load_demonstrations, save_demonstrations

    dense = make_env("ant-goal-ring")
    tasks = dense.training_tasks(jax.random.PRNGKey(0), 4)
    observations = np.zeros((4, 6, dense.observation_size), np.float32)
    actions = np.zeros((4, 6, dense.action_size), np.float32)
    path = save_demonstrations(str(tmp_path / "dense.npz"), dense.name,
                               jax.tree.map(np.asarray, tasks), observations, actions,
                               np.full((4,), 6), backend=dense.backend)
    demos = load_demonstrations(path, make_env("ant-goal-ring-sparse"))
    np.testing.assert_array_equal(np.asarray(demos.tasks["goal"]), np.asarray(tasks["goal"]))
    with pytest.raises(ConfigError, match="ant-goal accepts demonstrations of 'ant-goal'"):
        load_demonstrations(path, make_env("ant-goal"))
    # Experts on one physics do not teach a meta-learner on another.
    assert dense.backend == "generalized"
    with pytest.raises(ConfigError, match="dense.npz: backend: the experts ran on "
                                          "'generalized', this run's env.backend is 'spring'"):
        load_demonstrations(path, make_env("ant-goal-ring-sparse", backend="spring"))


@pytest.mark.slow
def test_a_fresh_walker_falls_and_the_phase_still_spends_its_budget():
    """Through `metarl train`: a fresh policy's walker falls within the 200 steps of a
    lane, so a phase holds more episodes than lanes; every step is a real transition,
    so `env_steps` is the real transition count."""
    from metarl_jax import run_config, trainer

    config = run_config.resolve_config({"algo": "promp", "env": {"name": "walker-dir"},
                                     "iterations": 1, "meta_batch_size": 2,
                                     "episodes_per_task": 3, "hidden_sizes": [8]})
    algorithm = run_config.build(config)[2]
    state = algorithm.init(jax.random.PRNGKey(config.run.seed))
    _, task_key, sample_key = jax.random.split(state.key, 3)
    tasks = algorithm.env.sample_tasks(task_key, 2)
    pre, post = jax.jit(lambda: sample_adaptation_phases(
        algorithm.env, algorithm.policy, algorithm.config, state.params, tasks, sample_key))()
    lanes, horizon = 2 * 3, algorithm.config.horizon
    assert horizon == 200
    real = float(jnp.sum(pre.masks) + jnp.sum(post.masks))
    (record,) = trainer.train(config, progress=False).history
    assert record["env_steps"] == real == 2 * lanes * horizon
    assert record["pre_episodes"] > lanes and record["post_episodes"] > lanes
    assert record["pre_episodes"] == float(pre.episode_count())
