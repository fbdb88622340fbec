"""Rollout-only throughput of every task and Brax backend at the paper's batch.

For each task and backend: the time to compile one sampling phase (M·N episodes of H
steps, the Gaussian policy at its initialisation, tasks drawn inside the program) and the
environment steps per second of later calls. Prints a table and appends it to
benchmarks/RESULTS.md with the machine named.

    python benchmarks/rollouts.py                                  # every task, 4 backends
    python benchmarks/rollouts.py --tasks ant-goal --backends spring generalized
    python benchmarks/rollouts.py --horizon 20                     # shorter timed episodes

The batch is M·N = 40·20 = 800 episodes per call (the ProMP paper's). `--horizon`
shortens the timed episodes on slow machines; steps per second is what the table
compares, and it does not depend on H once the batch fills the device.
"""

from __future__ import annotations

import argparse
import time

import jax

import harness
from metarl_jax.envs import BRAX_BACKENDS, env_names, make_env
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import collect


def bench_rollouts(env_name: str, backend: str, meta_batch: int, episodes: int,
                   horizon: int | None, repeats: int) -> dict:
    env = make_env(env_name, backend=backend, horizon=horizon)
    horizon = env.horizon
    policy = GaussianPolicy(env.observation_size, env.action_size,
                            (128, 128) if env_name.startswith("humanoid") else (64, 64))
    params = policy.init(jax.random.PRNGKey(0))

    @jax.jit
    def sample(key):
        task_key, rollout_key = jax.random.split(key)
        tasks = env.sample_tasks(task_key, meta_batch)
        batch = collect(env, policy, params, tasks, rollout_key, episodes, horizon,
                        per_task_params=False)
        return batch.rewards.sum()

    compile_start = time.perf_counter()
    sample.lower(jax.random.PRNGKey(1)).compile()
    compile_s = time.perf_counter() - compile_start
    _, seconds = harness.timed(sample, jax.random.PRNGKey(2), repeats=repeats)
    steps = meta_batch * episodes * horizon
    return dict(task=env_name, backend=backend, envs=meta_batch * episodes, horizon=horizon,
                compile_s=compile_s, seconds=seconds, steps_per_s=steps / seconds)


def format_table(rows: list[dict]) -> str:
    lines = ["| task | backend | envs (M·N) | H | compile s | s per phase | env steps/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | {r['backend']} | | | | | not run: {r['error']} |")
            continue
        lines.append(f"| {r['task']} | {r['backend']} | {r['envs']} | {r['horizon']} | "
                     f"{r['compile_s']:.1f} | {r['seconds']:.2f} | {r['steps_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+",
                        default=[n for n in env_names() if n != "point-nav"])
    parser.add_argument("--backends", nargs="+", default=list(BRAX_BACKENDS),
                        choices=BRAX_BACKENDS)
    parser.add_argument("--meta-batch", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=None,
                        help="timed episode length (default: the task's)")
    parser.add_argument("--repeats", type=int, default=2)
    harness.add_record_arguments(parser)
    args = parser.parse_args(argv)

    rows = []
    for task in args.tasks:
        for backend in args.backends:
            try:
                row = bench_rollouts(task, backend, args.meta_batch, args.episodes,
                                     args.horizon, args.repeats)
            except Exception as error:  # a backend that cannot run a body is a table row
                row = dict(task=task, backend=backend,
                           error=f"{type(error).__name__}: {str(error).splitlines()[0][:80]}")
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    table = format_table(rows)
    print(table)
    harness.record(
        args, "Rollout throughput per task and backend",
        f"One sampling phase of M·N = {args.meta_batch * args.episodes} episodes, "
        "random-initialised policy; `python benchmarks/rollouts.py"
        f"{'' if args.horizon is None else f' --horizon {args.horizon}'}`.", table)


if __name__ == "__main__":
    main()
