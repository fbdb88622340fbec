"""What Brax's half-cheetah physics does to a trained meta-policy.

Brax's half-cheetah differs from the MuJoCo model of the ProMP paper in two ways:
its `generalized` pipeline solves contacts and joint limits with its own soft
constraints, and its model lets only the head, thighs and feet touch the floor (the
torso and shins have `contype` 0; MuJoCo's Gym model collides every geom). This script
measures what each difference means for a meta-policy trained here:

    python experiments/halfcheetah_physics.py gait RUN [RUN ...]
    python experiments/halfcheetah_physics.py physics RUN [--physics generalized full-contact mjx]
    python experiments/halfcheetah_physics.py physics RUN --physics mjx mjx-ls20 mjx-ant-solver

`gait` adapts the run's meta-policy on held-out tasks (as `metarl eval` does) and, from
the visited states, reports how often each body part is below the floor and how often
the cheetah is upside down: a gait that never puts the torso or a shin into the floor
is untouched by the missing collisions. The states' joint angles come from the
observations (rootz, rooty and the six joints; Brax's observation is q[1:] then q̇),
and the geoms' heights from MuJoCo's forward kinematics of the same model file.

`physics` evaluates the same meta-policy, before and after its adaptation step, on the
same model under other physics: `full-contact` (the `generalized` pipeline with every
geom colliding with the floor, as in MuJoCo's model) and `mjx` (MuJoCo's own solver on
Brax's model). A return that holds across them says the policy's value does not hinge
on the difference. `mjx-ls20` and `mjx-ant-solver` are `mjx` with the solver cut back:
its line search capped at 20 steps instead of MuJoCo's 50, or the setting Brax gives
its ant (one Newton iteration, 4 line-search steps).

Both print a Markdown table; `--append FILE` also appends it there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.common import sample_adaptation_phases, standard_advantages
from metarl_jax.evaluation import EVAL_STREAM, restore_meta_state
from metarl_jax.losses import lvc_inner_loss
from metarl_jax.run_config import build
from metarl_jax.run_dir import load_run_config

PHYSICS = ("generalized", "full-contact", "mjx", "mjx-ls20", "mjx-ant-solver")
# MuJoCo solver options replaced on Brax's model, per `mjx-*` physics.
SOLVER_OPTIONS = {"mjx-ls20": {"opt.ls_iterations": 20},
                  "mjx-ant-solver": {"opt.iterations": 1, "opt.ls_iterations": 4}}
# Geoms that collide with the floor in Brax's model; the others pass through it.
COLLIDING = ("head", "bthigh", "bfoot", "fthigh", "ffoot")


def model_xml(full_contact: bool) -> str:
    import brax

    path = os.path.join(os.path.dirname(brax.__file__), "envs", "assets", "half_cheetah.xml")
    with open(path) as f:
        xml = f.read()
    if not full_contact:
        return xml
    default = '<geom conaffinity="0" condim="3" contype="0"'
    if default not in xml:
        raise RuntimeError(f"{path}: the geom default this script edits has changed")
    return xml.replace(default, default.replace('contype="0"', 'contype="1"'))


def load(run_dir: str, physics: str = "generalized"):
    """(config, algorithm, params, iteration) of the run's newest checkpoint, its
    environment running `physics`."""
    config = load_run_config(run_dir)
    if not config.run.env.name.startswith("halfcheetah"):
        raise SystemExit(f"{run_dir}: a half-cheetah run is needed, not {config.run.env.name}")
    backend = "mjx" if physics.startswith("mjx") else "generalized"
    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, env=dataclasses.replace(config.run.env, backend=backend)))
    env, policy, algorithm = build(config)
    if physics == "full-contact" or physics in SOLVER_OPTIONS:
        from brax.io import mjcf

        # A copy: the Brax environment is shared by every task env of its body.
        env.brax_env = copy.copy(env.brax_env)
        env.brax_env.sys = (mjcf.loads(model_xml(full_contact=True))
                            if physics == "full-contact"
                            else env.brax_env.sys.tree_replace(SOLVER_OPTIONS[physics]))
        algorithm = ALGORITHMS[config.run.algo](config.algorithm, env, policy)
    iteration, state, _ = restore_meta_state(run_dir, algorithm)
    return config, algorithm, state.params, iteration


def held_out_states(algorithm, params, num_tasks: int, seed: int):
    """Observations [phase, states, obs] of one adaptation step on held-out tasks
    (phase 0 before adaptation, 1 after), with the algorithm's inner loss."""
    config = dataclasses.replace(algorithm.config, meta_batch_size=num_tasks, inner_steps=1)
    inner_loss = getattr(algorithm, "inner_loss", lvc_inner_loss)
    process = getattr(algorithm, "process", standard_advantages)

    @jax.jit
    def sample(key):
        task_key, sample_key = jax.random.split(key)
        tasks = algorithm.env.sample_tasks(task_key, num_tasks)
        pre, post = sample_adaptation_phases(algorithm.env, algorithm.policy, config, params,
                                             tasks, sample_key, inner_loss, process)
        return pre.observations, post.observations

    key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
    pre, post = sample(key)
    obs_size = pre.shape[-1]
    return np.stack([np.asarray(pre).reshape(-1, obs_size), np.asarray(post).reshape(-1, obs_size)])


def lowest_points(observations: np.ndarray):
    """Per state and geom, the height of the geom's lowest point (m), and the geom
    names; rootx is irrelevant to heights and set to 0."""
    import mujoco

    model = mujoco.MjModel.from_xml_string(model_xml(full_contact=False))
    data = mujoco.MjData(model)
    capsule = mujoco.mjtGeom.mjGEOM_CAPSULE
    capsules = [g for g in range(model.ngeom) if model.geom_type[g] == capsule]
    names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_GEOM, g) for g in capsules]
    radius = model.geom_size[capsules, 0]
    half_length = model.geom_size[capsules, 1]
    heights = np.empty((len(observations), len(capsules)))
    for row, obs in enumerate(observations):
        data.qpos[0] = 0.0
        data.qpos[1:] = obs[:model.nq - 1]
        mujoco.mj_kinematics(model, data)
        axis_z = data.geom_xmat[capsules, 8]  # z component of each capsule's own z axis
        heights[row] = data.geom_xpos[capsules, 2] - half_length * np.abs(axis_z) - radius
    return heights, names


def run_label(run_dir: str, config, iteration: int) -> str:
    return f"{config.run.env.name} {os.path.basename(os.path.normpath(run_dir))} (it. {iteration})"


def gait_table(runs: list[str], num_tasks: int, seed: int, max_states: int) -> str:
    lines = []
    for run_dir in runs:
        config, algorithm, params, iteration = load(run_dir)
        states = held_out_states(algorithm, params, num_tasks, seed)
        rng = np.random.default_rng(seed)
        for phase, name in enumerate(("before adaptation", "after one step")):
            obs = states[phase]
            if len(obs) > max_states:
                obs = obs[rng.choice(len(obs), max_states, replace=False)]
            heights, geoms = lowest_points(obs)
            if not lines:
                lines += [f"| run | states | {' | '.join(geoms)} | deepest * (cm) | upside down |",
                          "|---|---|" + "---|" * (len(geoms) + 2)]
            below = (heights < 0).mean(axis=0)
            cells = [f"{100 * b:.1f} %" + ("" if g in COLLIDING else " *")
                     for g, b in zip(geoms, below)]
            passing = [i for i, g in enumerate(geoms) if g not in COLLIDING]
            deepest = max(0.0, -heights[:, passing].min())
            upside_down = (np.abs(obs[:, 1]) > math.pi / 2).mean()
            label = f"{run_label(run_dir, config, iteration)}, {name}"
            lines.append(f"| {label} | {len(obs):,} | {' | '.join(cells)} | "
                         f"{100 * deepest:.1f} | {100 * upside_down:.1f} % |")
    lines.append("")
    lines.append("Share of visited states in which each geom's lowest point is below the "
                 "floor (* passes through the floor in Brax's model, so touches it only "
                 "in MuJoCo's), the deepest such point of a * geom, and the share of "
                 f"states with the torso turned past 90°; {num_tasks} held-out tasks, "
                 f"seed {seed}.")
    return "\n".join(lines)


def physics_table(run_dir: str, physics: list[str], num_tasks: int, seed: int) -> str:
    lines = ["| run | physics | return before adaptation | after one step |",
             "|---|---|---|---|"]
    for name in physics:
        config, algorithm, params, iteration = load(run_dir, name)
        adapt = jax.jit(functools.partial(algorithm.adaptation_returns, adapt_steps=1,
                                          num_tasks=num_tasks,
                                          episodes_per_task=config.algorithm.episodes_per_task))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
        per_task = np.asarray(adapt(params, key).task_means)
        mean = per_task.mean(axis=0)
        stderr = per_task.std(axis=0, ddof=1) / math.sqrt(num_tasks)
        label = run_label(run_dir, config, iteration)
        lines.append(f"| {label} | {name} | {mean[0]:.1f} ± {stderr[0]:.1f} | "
                     f"{mean[1]:.1f} ± {stderr[1]:.1f} |")
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"Mean episode return (± s.e. over {num_tasks} held-out tasks, seed {seed}) "
                 "of the run's last meta-policy under each physics.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gait = sub.add_parser("gait", help="where the learned gait puts the body")
    gait.add_argument("runs", nargs="+")
    gait.add_argument("--max-states", type=int, default=20000)
    physics = sub.add_parser("physics", help="the meta-policy's return under other physics")
    physics.add_argument("run")
    physics.add_argument("--physics", nargs="+", choices=PHYSICS, default=list(PHYSICS))
    for command in (gait, physics):
        command.add_argument("--tasks", type=int, default=40)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--append", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "gait":
        table = gait_table(args.runs, args.tasks, args.seed, args.max_states)
    else:
        table = physics_table(args.run, args.physics, args.tasks, args.seed)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    sys.exit(main())
