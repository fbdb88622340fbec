"""Brax locomotion task distributions of the ProMP, GMPS and MAML papers.

Each task wraps one stock Brax environment and replaces its reward with the task's own,
computed from the quantities Brax reports in `state.metrics` and from the environment
action (after the ±10 → ±1 scaling; GMPS's ant ring acts in the ±1 box itself), so the
reward formulas read exactly as in the task tables. Termination (unhealthy ant, walker,
hopper, humanoid) comes from Brax's own `done`; the rollout then starts a fresh episode
of the same task in that lane.

Physics-parameter tasks (`*-params`) carry their own scale factors and rebuild the Brax
`System` from them inside the traced step, so tasks with different physics run side by
side in one vmapped call and one compilation serves any draw.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import warnings

import jax
import jax.numpy as jnp

from metarl_jax.config import BRAX_BACKENDS
from metarl_jax.envs.base import EnvState, TaskEnv, scale_locomotion_action
from metarl_jax.envs.registry import register_task


@functools.lru_cache(maxsize=None)
def _brax_env(brax_name: str, backend: str, options: tuple = ()):
    # Loading and parsing the MJCF model takes a second; every task of the same body,
    # backend and options can share one Brax environment since it holds no task
    # information. MuJoCo's optional warp backend prints to stdout when warp is absent,
    # and Brax warns on every load that it is in maintenance mode: keep our command-line
    # output clean of both.
    with (contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(),
          _without_mujoco_deprecation_notes()):
        warnings.filterwarnings("ignore", message="Brax System", category=UserWarning)
        from brax import envs as brax_envs

        return brax_envs.get_environment(brax_name, backend=backend, **dict(options))


@contextlib.contextmanager
def _without_mujoco_deprecation_notes():
    """MuJoCo's compiler writes deprecation notes about Brax's stock models straight to
    file descriptor 2; keep every other line it writes."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if "is deprecated and will be removed" not in line and line.strip():
                    sys.stderr.write(line)


@functools.lru_cache(maxsize=None)
def _observation_size(brax_name: str, backend: str, options: tuple = ()) -> int:
    # Brax's own `observation_size` runs `reset` eagerly, op by op (seconds for the
    # humanoid); tracing it for the shape alone is enough.
    env = _brax_env(brax_name, backend, options)
    return int(jax.eval_shape(env.reset, jax.random.PRNGKey(0)).obs.shape[-1])


class BraxTaskEnv(TaskEnv):
    """A Brax body plus a task-conditioned reward.

    A subclass declares `observation_size` and `action_size` (so the task is listed
    without loading its model); building it checks them against what the Brax model
    reports, on any backend. A subclass that declares none takes the model's.
    """

    brax_name: str
    # Constructor options of the Brax environment, as (name, value) pairs.
    brax_options: tuple = ()
    action_scale = 10.0
    # The physics pipeline when `env.backend` names none: of the two that solve MuJoCo's
    # equations of motion, the faster on a CPU (`generalized` for the planar bodies,
    # `mjx` for the ant and the humanoid; docs/environments.md).
    default_backend = BRAX_BACKENDS[0]

    def __init__(self, backend: str | None = None, horizon: int | None = None):
        backend = self.default_backend if backend is None else backend
        if backend not in BRAX_BACKENDS:
            raise ValueError(f"env.backend: unknown Brax backend {backend!r}; "
                             f"allowed: {', '.join(BRAX_BACKENDS)}")
        self.backend = backend
        self.brax_env = _brax_env(self.brax_name, backend, self.brax_options)
        built = {"observation_size": _observation_size(self.brax_name, backend,
                                                       self.brax_options),
                 "action_size": int(self.brax_env.action_size)}
        for attribute, size in built.items():
            declared = getattr(type(self), attribute, None)
            if declared is not None and declared != size:
                raise TypeError(f"{type(self).__qualname__}: declares {attribute} {declared}, "
                                f"but Brax's {self.brax_name} ({backend}) has {size}")
            setattr(self, attribute, size)
        if horizon is not None:
            self.horizon = horizon

    def raw_action_bound(self):
        return self.action_scale  # `scale_locomotion_action` clips a / scale to ±1

    def simulator(self, task):
        """The Brax environment that runs `task`: the shared one, unless the task
        changes the physics."""
        return self.brax_env

    def reset(self, key, task):
        brax_state = self.simulator(task).reset(key)
        return EnvState(obs=brax_state.obs, reward=jnp.zeros(()), done=jnp.zeros(()),
                        physics=brax_state)

    def step(self, state, action, task):
        env_action = scale_locomotion_action(action, self.action_scale)
        brax_state = self.simulator(task).step(state.physics, env_action)
        reward = self.task_reward(brax_state.metrics, env_action, task)
        return EnvState(obs=brax_state.obs, reward=reward, done=brax_state.done,
                        physics=brax_state)

    def task_reward(self, metrics: dict, env_action: jax.Array, task) -> jax.Array:
        raise NotImplementedError


def _random_sign(key, num_tasks):
    return jnp.where(jax.random.bernoulli(key, 0.5, (num_tasks,)), 1.0, -1.0)


@register_task("halfcheetah-dir")
class HalfCheetahDirection(BraxTaskEnv):
    observation_size = 17
    action_size = 6
    brax_name = "halfcheetah"
    horizon = 100
    can_terminate = False  # Brax's halfcheetah never reports done
    task_distribution = "direction d in {-1, +1}; reward d*v_x - 0.05||a||^2"
    ctrl_cost_weight = 0.05

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_sign(key, num_tasks)}

    def task_reward(self, metrics, env_action, task):
        return (task["direction"] * metrics["x_velocity"]
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


@register_task("halfcheetah-vel")
class HalfCheetahVelocity(BraxTaskEnv):
    observation_size = 17
    action_size = 6
    brax_name = "halfcheetah"
    horizon = 100
    can_terminate = False  # Brax's halfcheetah never reports done
    task_distribution = "target velocity v* ~ U[0, 2]; reward -|v_x - v*| - 0.05||a||^2"
    ctrl_cost_weight = 0.05

    def sample_tasks(self, key, num_tasks):
        return {"velocity": jax.random.uniform(key, (num_tasks,), minval=0.0, maxval=2.0)}

    def task_reward(self, metrics, env_action, task):
        return (-jnp.abs(metrics["x_velocity"] - task["velocity"])
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


@register_task("ant-dir")
class AntDirection(BraxTaskEnv):
    """Ant running forward or backward along x.

    Brax's ant exposes no contact forces (its `use_contact_forces` is unimplemented), so
    the contact cost of the MuJoCo task is zero here, as in every Brax ant.
    """

    observation_size = 27
    action_size = 8
    brax_name = "ant"
    default_backend = "mjx"
    horizon = 100
    task_distribution = ("direction d in {-1, +1}; reward d*v_x - 0.5||a||^2 - contact + 1; "
                         "terminates when unhealthy")
    ctrl_cost_weight = 0.5
    survive_reward = 1.0

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_sign(key, num_tasks)}

    def directed_velocity(self, metrics, task):
        return task["direction"] * metrics["x_velocity"]

    def task_reward(self, metrics, env_action, task):
        contact_cost = -metrics["reward_contact"]
        return (self.directed_velocity(metrics, task)
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2)
                - contact_cost + self.survive_reward)


def _random_unit_vectors(key, num_tasks):
    # A normal draw normalised is uniform on the circle.
    normal = jax.random.normal(key, (num_tasks, 2))
    return normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)


def _planar_velocity(metrics):
    return jnp.stack([metrics["x_velocity"], metrics["y_velocity"]])


def _planar_position(metrics):
    return jnp.stack([metrics["x_position"], metrics["y_position"]])


@register_task("ant-dir2d")
class AntDirection2D(AntDirection):
    """Ant running along a direction drawn uniformly on the circle."""

    task_distribution = ("direction u = n/||n||, n ~ N(0, I2); reward u.(v_x, v_y) "
                         "- 0.5||a||^2 - contact + 1; terminates when unhealthy")

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_unit_vectors(key, num_tasks)}

    def directed_velocity(self, metrics, task):
        return jnp.dot(task["direction"], _planar_velocity(metrics))


@register_task("ant-goal")
class AntGoal(BraxTaskEnv):
    """Ant walking to a goal position in the disc of radius 3 (ProMP AntRandGoal).

    The torso's x, y position is part of the observation here (Brax's ant hides it by
    default): without it no policy can tell where it stands relative to the goal.
    """

    observation_size = 29
    action_size = 8
    brax_name = "ant"
    default_backend = "mjx"
    brax_options = (("exclude_current_positions_from_observation", False),)
    horizon = 200
    task_distribution = ("goal in the disc of radius 3 (angle U[0, 2pi), r = 3 sqrt(U)); "
                         "reward -||xy - g||_1 - 0.1||a||^2 - contact; "
                         "terminates when unhealthy")
    ctrl_cost_weight = 0.1
    goal_radius = 3.0

    def sample_tasks(self, key, num_tasks):
        angle_key, radius_key = jax.random.split(key)
        angle = jax.random.uniform(angle_key, (num_tasks,), minval=0.0, maxval=2 * math.pi)
        radius = self.goal_radius * jnp.sqrt(jax.random.uniform(radius_key, (num_tasks,)))
        goal = radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
        return {"goal": goal}

    def task_reward(self, metrics, env_action, task):
        contact_cost = -metrics["reward_contact"]
        goal_distance_l1 = jnp.sum(jnp.abs(_planar_position(metrics) - task["goal"]))
        return (-goal_distance_l1 - self.ctrl_cost_weight * jnp.sum(env_action ** 2)
                - contact_cost)


def ring_goals(num_goals: int = 40, radius: float = 2.0) -> jax.Array:
    """The GMPS ant goals: `num_goals` points on the quarter circle of `radius`."""
    angle = jnp.linspace(0.0, math.pi / 2, num_goals)
    return radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)


@register_task("ant-goal-ring")
class AntGoalRing(BraxTaskEnv):
    """Ant walking to one of 40 goals on a quarter circle of radius 2 (GMPS).

    As GMPS's own ant environment (`ant_env_rand_goal_ring.py`, run through rllab's
    normalised ±1 action box), not ProMP's ant tasks:
    - the policy acts in the simulator's own ±1 box (`action_scale` 1): the environment
      receives `clip(a, -1, 1)`;
    - reward `-||xy - g||_1 + 4 - 0.005||a/s||^2 - contact + 0.05`, with a the
      environment action and s = 1 the half-width of the simulator's action box;
    - the episode terminates when the torso height leaves [0.2, 1.0];
    - the torso's x, y are part of the observation.
    Brax's ant reports no contact forces, so the contact term is 0 here. The finite task
    set is exposed by `task_set()`, which GMPS uses as its meta-training tasks.
    """

    observation_size = 29
    action_size = 8
    brax_name = "ant"
    # GMPS's ring experiments (experts, demonstrations, meta-training) were made
    # on `generalized`; the ring keeps it so that they repeat.
    default_backend = "generalized"
    healthy_z_range = (0.2, 1.0)
    brax_options = (("exclude_current_positions_from_observation", False),
                    ("healthy_z_range", healthy_z_range), ("terminate_when_unhealthy", True))
    horizon = 200
    task_distribution = ("one of 40 goals on the quarter circle of radius 2; "
                         "reward -||xy - g||_1 + 4 - 0.005||a||^2 - contact + 0.05, "
                         "a in the ±1 box; terminates when the torso height leaves "
                         "[0.2, 1]")
    action_scale = 1.0
    ctrl_cost_weight = 0.005
    survive_reward = 0.05
    num_goals = 40
    sparse = False
    sparse_radius = 0.8

    def task_set(self):
        return {"goal": ring_goals(self.num_goals)}

    def sample_tasks(self, key, num_tasks):
        index = jax.random.randint(key, (num_tasks,), 0, self.num_goals)
        return {"goal": ring_goals(self.num_goals)[index]}

    def goal_reward(self, position, goal):
        dense = -jnp.sum(jnp.abs(position - goal)) + 4.0
        if not self.sparse:
            return dense
        # Outside the 0.8 disc the goal term is its value at the start, -||g||_1 + 4:
        # the adaptation signal only appears once the ant reaches the goal's vicinity.
        outside = jnp.linalg.norm(position - goal) > self.sparse_radius
        return jnp.where(outside, -jnp.sum(jnp.abs(goal)) + 4.0, dense)

    def task_reward(self, metrics, env_action, task):
        contact_cost = -metrics["reward_contact"]
        # The simulator's action box is ±1, so a / s is the environment action itself.
        return (self.goal_reward(_planar_position(metrics), task["goal"])
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2) - contact_cost
                + self.survive_reward)


@register_task("ant-goal-ring-sparse")
class AntGoalRingSparse(AntGoalRing):
    sparse = True
    demonstration_sources = ("ant-goal-ring",)
    task_distribution = ("one of 40 goals on the quarter circle of radius 2; goal term "
                         "-||xy - g||_1 + 4 inside 0.8 of g, else -||g||_1 + 4; "
                         "- 0.005||a||^2 - contact + 0.05, a in the ±1 box; terminates "
                         "when the torso height leaves [0.2, 1]")


@register_task("walker-dir")
class WalkerDirection(BraxTaskEnv):
    """Walker2d running forward or backward; Brax's healthy range ends the episode."""

    observation_size = 17
    action_size = 6
    brax_name = "walker2d"
    horizon = 200
    task_distribution = ("direction d in {-1, +1}; reward d*v_x + 1 - 1e-3||a||^2; "
                         "terminates when unhealthy")
    ctrl_cost_weight = 1e-3
    survive_reward = 1.0

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_sign(key, num_tasks)}

    def task_reward(self, metrics, env_action, task):
        return (task["direction"] * metrics["x_velocity"] + self.survive_reward
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


@register_task("walker-vel")
class WalkerVelocity(BraxTaskEnv):
    observation_size = 17
    action_size = 6
    brax_name = "walker2d"
    horizon = 200
    task_distribution = ("target velocity v* ~ U[0, 10]; reward -|v_x - v*| + 15 "
                         "- 1e-3||a||^2; terminates when unhealthy")
    ctrl_cost_weight = 1e-3
    survive_reward = 15.0
    max_velocity = 10.0

    def sample_tasks(self, key, num_tasks):
        return {"velocity": jax.random.uniform(key, (num_tasks,), minval=0.0,
                                               maxval=self.max_velocity)}

    def task_reward(self, metrics, env_action, task):
        return (-jnp.abs(metrics["x_velocity"] - task["velocity"]) + self.survive_reward
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


class PhysicsParameters(BraxTaskEnv):
    """Forward running with per-task physics (ProMP's *RandParams, from rand_param_envs).

    A task holds multiplicative scales: one per link mass, one per component of each
    link's principal inertia, one per degree-of-freedom damping and one per component
    of each geom's friction, each `base ** U(-3, 3)` (base 1.5, damping 1.3). `simulator`
    rebuilds the Brax `System` from the task inside the traced program, in both of the
    forms Brax keeps (its own `link`/`dof` tree for the generalized, positional and spring
    pipelines, MuJoCo's `body_*`/`dof_*` arrays for mjx and contact), so vmapping over
    tasks vmaps the physics too. The `spring` and `positional` pipelines themselves
    ignore part of these: they use mass^(1 - s) and inertia^(1 - s) with s set per model
    (s = 1, so no effect, for the hopper's masses and both bodies' inertias) and have no
    joint damping. The published setting is `generalized`, which uses all four.
    """

    horizon = 200
    ctrl_cost_weight = 1e-3
    survive_reward = 1.0
    log_scale_limit = 3.0
    mass_base = 1.5
    inertia_base = 1.5
    damping_base = 1.3
    friction_base = 1.5

    def sample_tasks(self, key, num_tasks):
        sys = self.brax_env.sys
        num_links = sys.num_links()
        shapes = {"mass": (num_links,), "inertia": (num_links, 3),
                  "damping": (sys.qd_size(),), "friction": tuple(sys.geom_friction.shape)}
        bases = {"mass": self.mass_base, "inertia": self.inertia_base,
                 "damping": self.damping_base, "friction": self.friction_base}
        keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
        return {
            f"{name}_scale": bases[name] ** jax.random.uniform(
                keys[name], (num_tasks, *shape), minval=-self.log_scale_limit,
                maxval=self.log_scale_limit)
            for name, shape in shapes.items()
        }

    def system(self, task):
        """The Brax `System` of `task` (a single task, no leading axis)."""
        sys = self.brax_env.sys
        mass_scale, inertia_scale = task["mass_scale"], task["inertia_scale"]
        # The link inertia is diagonal in its principal frame; scaling it by
        # sqrt(s) on both sides scales each principal moment by s and keeps it symmetric.
        root = jnp.sqrt(inertia_scale)
        link_inertia = sys.link.inertia.i * root[:, :, None] * root[:, None, :]
        return sys.tree_replace({
            "link.inertia.mass": sys.link.inertia.mass * mass_scale,
            "link.inertia.i": link_inertia,
            "body_mass": sys.body_mass.at[1:].multiply(mass_scale),
            "body_inertia": sys.body_inertia.at[1:].multiply(inertia_scale),
            "dof.damping": sys.dof.damping * task["damping_scale"],
            "dof_damping": sys.dof_damping * task["damping_scale"],
            "geom_friction": sys.geom_friction * task["friction_scale"],
        })

    def simulator(self, task):
        # A shallow copy costs nothing at trace time and leaves the shared environment
        # untouched; its `sys` holds traced arrays, so no draw of tasks is a constant.
        env = copy.copy(self.brax_env)
        env.sys = self.system(task)
        return env

    def task_reward(self, metrics, env_action, task):
        return (metrics["x_velocity"] + self.survive_reward
                - self.ctrl_cost_weight * jnp.sum(env_action ** 2))


@register_task("hopper-params")
class HopperParameters(PhysicsParameters):
    observation_size = 11
    action_size = 3
    brax_name = "hopper"
    task_distribution = ("masses, inertias x1.5^U(-3,3), damping x1.3^U(-3,3), friction "
                         "x1.5^U(-3,3); reward v_x + 1 - 1e-3||a||^2; terminates when "
                         "unhealthy")


@register_task("walker-params")
class WalkerParameters(PhysicsParameters):
    observation_size = 17
    action_size = 6
    brax_name = "walker2d"
    task_distribution = HopperParameters.task_distribution


@register_task("humanoid-dir")
class HumanoidDirection(BraxTaskEnv):
    """Humanoid running forward or backward.

    Brax's humanoid reward with the forward term multiplied by the direction:
    1.25 d v_x(centre of mass) - 0.1||ctrl||^2 + 5, the control cost on the actuator
    command Brax derives from the ±1 action. Brax reports no contact forces, so there is
    no impact cost (as in every Brax humanoid).
    """

    observation_size = 244
    action_size = 17
    brax_name = "humanoid"
    default_backend = "mjx"
    horizon = 200
    task_distribution = ("direction d in {-1, +1}; reward 1.25 d*v_com,x - 0.1||ctrl||^2 "
                         "+ 5; terminates when unhealthy")
    forward_reward_weight = 1.25

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_sign(key, num_tasks)}

    def directed_velocity(self, metrics, task):
        return task["direction"] * metrics["x_velocity"]

    def task_reward(self, metrics, env_action, task):
        return (self.forward_reward_weight * self.directed_velocity(metrics, task)
                + metrics["reward_quadctrl"] + metrics["reward_alive"])


@register_task("humanoid-dir2d")
class HumanoidDirection2D(HumanoidDirection):
    task_distribution = ("direction u uniform on the circle; reward 1.25 u.v_com,xy "
                         "- 0.1||ctrl||^2 + 5; terminates when unhealthy")

    def sample_tasks(self, key, num_tasks):
        return {"direction": _random_unit_vectors(key, num_tasks)}

    def directed_velocity(self, metrics, task):
        return jnp.dot(task["direction"], _planar_velocity(metrics))
