"""What restarting fallen episodes costs: one sampling phase of a terminating Brax task
with its lanes resetting on `done` (what training uses) against the same phase with the
lanes idling after the end, compiled in one process and timed in interleaved rounds.

A resetting lane computes a fresh start state at every step (vmapped code cannot branch
per lane) and keeps stepping bodies that an idle lane would freeze, so the reset form is
expected to cost more per phase; the table also gives the real transitions each form
yields, which is what the extra time buys.

    python benchmarks/episode_reset.py                       # walker-dir, ant-dir
    python benchmarks/episode_reset.py --tasks hopper-params --envs 100 --horizon 200
"""

from __future__ import annotations

import argparse
import copy
import statistics

import jax
import jax.numpy as jnp

import harness
from metarl_jax.envs import make_env
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import collect


def phase_program(env, policy, params, num_tasks: int, lanes: int, horizon: int):
    @jax.jit
    def sample(key):
        task_key, rollout_key = jax.random.split(key)
        tasks = env.sample_tasks(task_key, num_tasks)
        batch = collect(env, policy, params, tasks, rollout_key, lanes, horizon,
                        per_task_params=False)
        return jnp.sum(batch.masks), batch.episode_count()

    return sample


def bench_task(name: str, backend: str | None, num_tasks: int, lanes: int, horizon: int,
               rounds: int) -> list[dict]:
    env = make_env(name, backend=backend, horizon=horizon)
    idle_env = copy.copy(env)
    idle_env.episode_end = "idle"
    policy = GaussianPolicy(env.observation_size, env.action_size, (64, 64))
    params = policy.init(jax.random.PRNGKey(0))
    programs = {"reset": phase_program(env, policy, params, num_tasks, lanes, horizon),
                "idle": phase_program(idle_env, policy, params, num_tasks, lanes, horizon)}
    outputs = {form: jax.device_get(program(jax.random.PRNGKey(1)))  # compiles
               for form, program in programs.items()}
    key = jax.random.PRNGKey(2)
    seconds = harness.interleaved({form: lambda program=program: program(key)
                                   for form, program in programs.items()}, rounds)
    rows = []
    for form in programs:
        transitions, episodes = (float(x) for x in outputs[form])
        rows.append(dict(task=name, backend=env.backend, form=form,
                         budget=num_tasks * lanes * horizon,
                         transitions=transitions, episodes=episodes,
                         seconds=statistics.median(seconds[form])))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| task | backend | lanes after an end | budget M·N·H | real transitions | "
             "episodes | s per phase (median) | real transitions/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['backend']} | {r['form']} | {r['budget']:,} | "
                     f"{r['transitions']:,.0f} | {r['episodes']:,.0f} | {r['seconds']:.2f} | "
                     f"{r['transitions'] / r['seconds']:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["walker-dir", "ant-dir"])
    parser.add_argument("--backend", default=None,
                        help="Brax backend (default: each task's own)")
    parser.add_argument("--tasks-per-phase", type=int, default=10)
    parser.add_argument("--envs", type=int, default=10, help="lanes per task (N)")
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    harness.add_record_arguments(parser)
    args = parser.parse_args(argv)
    rows = []
    for name in args.tasks:
        rows += bench_task(name, args.backend, args.tasks_per_phase, args.envs, args.horizon,
                           args.rounds)
        print(format_table(rows), flush=True)
    table = format_table(rows)
    harness.record(
        args, "Restarting fallen episodes against idling lanes",
        f"One phase of M = {args.tasks_per_phase} tasks × N = {args.envs} lanes × "
        f"H = {args.horizon}, fresh policy, both forms compiled in one process and timed "
        f"in {args.rounds} interleaved rounds; `python benchmarks/episode_reset.py`.",
        table)


if __name__ == "__main__":
    main()
