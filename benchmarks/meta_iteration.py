"""Seconds per meta-iteration (after compilation) of the chosen algorithms and batches,
with one knob varied per mode; prints a table and appends it to benchmarks/RESULTS.md
with the machine named.

    python benchmarks/meta_iteration.py                       # ProMP, both settings
    python benchmarks/meta_iteration.py --settings point-nav --repeats 20
    python benchmarks/meta_iteration.py --algos promp maml-trpo dice-vpg --settings point-nav
    python benchmarks/meta_iteration.py --backend spring      # Brax backend for Brax tasks
    python benchmarks/meta_iteration.py --mode scaling --algos maml-trpo --tasks 10 20 40 80
    python benchmarks/meta_iteration.py --mode fused --fuse 1 5 20
    python benchmarks/meta_iteration.py --mode train --algos maml-trpo --iterations 20

Modes:

- `iteration` (the default): compile time, seconds per meta-iteration, the rollouts
  alone, GFLOP, GFLOP/s and peak memory, one row per algorithm, setting and device
  count. The rollout-only figure samples the same K + 1 phases of M·N·H steps with the
  same policy network and no learning: it is the floor a meta-iteration cannot go under.
- `scaling`: the same figures with one of M, N and H varied at a time from the setting's
  batch, and the growth of the time per doubling.
- `fused`: several meta-iterations per compiled call (`lax.scan` over the iteration)
  against one per call, the metrics fetched after every call as the trainer does.
- `train`: through `metarl train` in a fresh process per variant, the CPU whole or split
  (`--cpu-devices 1`, `2`) and one or five iterations per call; the figure is the median
  `iteration_s` of the run's records after the fifth.

`--batch M N H` replaces the settings' batch (a small one checks that a mode runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import harness
from metarl_jax import distributed
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.common import broadcast_to_tasks
from metarl_jax.rollout import collect

MODES = ("iteration", "scaling", "fused", "train")

# Each variant names the call length, since the default depends on the task.
TRAIN_VARIANTS = {
    f"`--cpu-devices {devices} --set iterations_per_call={fused}`":
        ["--cpu-devices", str(devices), "--set", f"iterations_per_call={fused}"]
    for devices in (1, 2) for fused in (1, 5)
}


def bench(algo: str, env_name: str, meta_batch: int, episodes: int, horizon: int,
          backend: str = "generalized", repeats: int = 5, name: str | None = None,
          devices: int = 1) -> dict:
    """Compile time, seconds per meta-iteration and the rollout-only floor of one batch,
    with the tasks sharded over `devices` devices (as `metarl train` shards them)."""
    name = name or env_name
    env, policy, algorithm = harness.build_algorithm(algo, env_name, meta_batch, episodes,
                                                     horizon, backend)
    config = algorithm.config
    sharding = distributed.task_sharding(devices)
    distributed.check_divisible(meta_batch, sharding)
    state = jax.device_put(algorithm.init(jax.random.PRNGKey(0)),
                           distributed.replicated(sharding))

    compile_start = time.perf_counter()
    with distributed.use_task_sharding(sharding):
        compiled = jax.jit(algorithm.meta_iteration).lower(state).compile()
    compile_s = time.perf_counter() - compile_start
    _, per_iteration = harness.timed(lambda s: compiled(s)[1], state, repeats=repeats)
    xla_flops = xla_flops_per_call(compiled)
    model_flops = model_flops_per_iteration(policy, config, algo)

    @jax.jit
    def rollouts_only(params, key):
        tasks = distributed.shard_tasks(env.sample_tasks(key, meta_batch))
        per_task = broadcast_to_tasks(params, meta_batch)

        def phase(carry, phase_key):
            batch = collect(env, policy, per_task, tasks, phase_key, episodes, horizon)
            return carry, jnp.sum(batch.rewards)

        return jax.lax.scan(phase, 0.0, jax.random.split(key, config.inner_steps + 1))[1]

    with distributed.use_task_sharding(sharding):  # traced on the first call
        _, rollout_time = harness.timed(rollouts_only, state.params, jax.random.PRNGKey(1),
                                        repeats=repeats)
    steps = algorithm.env_steps_per_iteration
    return {"algo": algo, "setting": f"{name} (M={meta_batch}, N={episodes}, H={horizon})",
            "backend": env.backend or "-", "devices": devices, "compile_s": compile_s,
            "iteration_s": per_iteration, "rollout_s": rollout_time,
            "steps_per_s": steps / per_iteration,
            "rollout_share": rollout_time / per_iteration,
            "model_gflops": model_flops / 1e9, "xla_gflops": xla_flops / 1e9,
            "gflops_per_s": model_flops / per_iteration / 1e9,
            "memory_mb": peak_memory_bytes(compiled) / 2 ** 20}


def xla_flops_per_call(compiled) -> float:
    """XLA's own count for one call (a loop body is counted once, so the rollout scans
    are undercounted; the outer steps, which are not loops, are counted in full)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def peak_memory_bytes(compiled) -> float:
    """Peak device memory of one call: the allocator's high-water mark where the device
    reports one (GPU, TPU), else XLA's buffer assignment (arguments + outputs + temps)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"])
    memory = compiled.memory_analysis()
    if memory is None:
        return float("nan")
    return float(memory.argument_size_in_bytes + memory.output_size_in_bytes
                 + memory.temp_size_in_bytes)


def forward_flops(policy, samples: int) -> float:
    widths = [policy.observation_size, *policy.hidden_sizes, policy.action_size]
    return 2.0 * samples * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def model_flops_per_iteration(policy, config, algo: str) -> float:
    """Floating-point operations of one meta-iteration's network work, by the rule of
    thumb: sampling is one forward pass per step; a second-order outer step
    costs about ten forward passes over the pre-update data plus three over the
    post-update data, a first-order one (or an inner step alone) about three over each.
    The P (ProMP), line-search and CG (TRPO) multiples are the algorithm's own."""
    per_phase = config.meta_batch_size * config.episodes_per_task * config.horizon
    pre = config.inner_steps * per_phase
    sampling = forward_flops(policy, (config.inner_steps + 1) * per_phase)
    inner_steps = 3 * forward_flops(policy, pre)  # the adaptation between phases
    second_order = getattr(config, "first_order", False) is False
    outer = (10 if second_order else 3) * forward_flops(policy, pre) \
        + 3 * forward_flops(policy, per_phase)
    if algo == "promp":
        outer *= config.promp_steps
    elif algo.endswith("-trpo"):
        # gradient + CG iterations of a Gauss-Newton Fisher-vector product (two
        # inner-Hessian products, each 6 passes over the pre data: the tangents of the
        # forward pass, of the backward pass and of the weight gradients; a linearised
        # forward and its transpose over the post data, 4 passes) + one line-search
        # evaluation (the usual case: the first candidate is accepted; the inner step
        # and the post loss, ~4 passes)
        outer += config.cg_iterations * (12 * forward_flops(policy, pre)
                                         + 4 * forward_flops(policy, per_phase)) \
            + 3 * forward_flops(policy, pre) + forward_flops(policy, per_phase)
    elif algo == "memrl":
        outer = 3 * forward_flops(policy, pre)  # proximal steps are ordinary PG steps
    return sampling + inner_steps + outer


def fused_seconds_per_iteration(algo: str, env_name: str, meta_batch: int, episodes: int,
                                horizon: int, backend: str, fuse: int, calls: int) -> float:
    """Median seconds per iteration of `calls` calls that run `fuse` meta-iterations each."""
    _, _, algorithm = harness.build_algorithm(algo, env_name, meta_batch, episodes, horizon,
                                              backend)
    state = algorithm.init(jax.random.PRNGKey(0))

    def fused(state):
        return jax.lax.scan(lambda s, _: algorithm.meta_iteration(s), state, None,
                            length=fuse)

    step = jax.jit(fused, donate_argnums=0)
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        state, metrics = step(state)
        jax.device_get(metrics)  # what the trainer does after every call
        samples.append((time.perf_counter() - start) / fuse)
    return statistics.median(samples)


def train_seconds_per_iteration(algo: str, env_name: str, meta_batch: int, episodes: int,
                                horizon: int, backend: str, iterations: int,
                                flags: list[str]) -> float:
    """Median `iteration_s` after the fifth record of one `metarl train` run."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "metarl_jax.cli", "train", "--algo", algo,
                        "--env", env_name, "--iterations", str(iterations),
                        "--set", f"env.backend={backend}",
                        "--set", f"meta_batch_size={meta_batch}",
                        "--set", f"episodes_per_task={episodes}",
                        "--set", f"horizon={horizon}",
                        "--set", f"checkpoint_every={iterations}", "--out", out, "--force",
                        "--quiet", *flags], check=True, capture_output=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return statistics.median(r["iteration_s"] for r in records[5:])


def iteration_mode(args, batches) -> None:
    rows = [bench(algo, env_name, m, n, h, args.backend, args.repeats, name, devices)
            for name, (env_name, m, n, h) in batches for algo in args.algos
            for devices in args.devices]
    header = ("| algo | setting | backend | devices | compile (s) | s / meta-iteration | "
              "rollouts alone (s) | rollout share | env steps / s | GFLOP (model / XLA) | "
              "GFLOP/s | peak memory (MiB) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['algo']} | {r['setting']} | {r['backend']} | {r['devices']} | "
             f"{r['compile_s']:.1f} | "
             f"{r['iteration_s']:.3f} | {r['rollout_s']:.3f} | {r['rollout_share']:.0%} | "
             f"{r['steps_per_s']:,.0f} | {r['model_gflops']:.1f} / {r['xla_gflops']:.1f} | "
             f"{r['gflops_per_s']:.0f} | {r['memory_mb']:.0f} |" for r in rows]
    table = "\n".join([header, *lines])
    print(table)
    harness.record(args, "Meta-iteration", f"Median of {args.repeats} calls after the first.",
                   table)


def scaling_mode(args, batches) -> None:
    for name, (env_name, base_m, base_n, base_h) in batches:
        for algo in args.algos:
            sweeps = {
                "M": [(m, base_n, base_h) for m in sorted(set(args.tasks) | {base_m})],
                "N": [(base_m, n, base_h) for n in sorted(set(args.episodes) | {base_n})],
                "H": [(base_m, base_n, h) for h in sorted(set(args.horizons) | {base_h})]}
            measured: dict = {}
            lines = ["| sweep | M | N | H | s / meta-iteration | rollouts alone (s) | "
                     "× per doubling | env steps / s |", "|---|---|---|---|---|---|---|---|"]
            for sweep, sizes in sweeps.items():
                previous = None
                for m, n, h in sizes:
                    if (m, n, h) not in measured:
                        measured[(m, n, h)] = bench(algo, env_name, m, n, h, args.backend,
                                                    args.repeats, name)
                        print(m, n, h, f"{measured[(m, n, h)]['iteration_s']:.3f}",
                              flush=True)
                    row = measured[(m, n, h)]
                    size = {"M": m, "N": n, "H": h}[sweep]
                    growth = ""
                    if previous is not None:
                        last_size, last_time = previous
                        ratio = row["iteration_s"] / last_time
                        growth = f"{ratio ** (1 / math.log2(size / last_size)):.2f}"
                    previous = (size, row["iteration_s"])
                    lines.append(f"| {sweep} | {m} | {n} | {h} | {row['iteration_s']:.3f} | "
                                 f"{row['rollout_s']:.3f} | {growth} | "
                                 f"{row['steps_per_s']:,.0f} |")
            table = "\n".join(lines)
            print(table)
            harness.record(
                args, f"Scaling, {algo} on {env_name}",
                f"Median of {args.repeats} calls after the first; one size varied per "
                f"sweep from M = {base_m}, N = {base_n}, H = {base_h}; growth is the time "
                "ratio per doubling against the previous row of the sweep (1.0: free, "
                "2.0: linear).", table)


def fused_mode(args, batches) -> None:
    lines = ["| algo | setting | iterations per call | s / meta-iteration | vs first row |",
             "|---|---|---|---|---|"]
    for name, (env_name, m, n, h) in batches:
        for algo in args.algos:
            rows = [(fuse, fused_seconds_per_iteration(algo, env_name, m, n, h, args.backend,
                                                       fuse, max(3, args.iterations // fuse)))
                    for fuse in args.fuse]
            base = rows[0][1]
            lines += [f"| {algo} | {name} | {fuse} | {seconds:.3f} | {seconds / base:.2f} |"
                      for fuse, seconds in rows]
    table = "\n".join(lines)
    print(table)
    harness.record(args, "Fused meta-iterations", "Median over the calls, per iteration.",
                   table)


def train_mode(args, batches) -> None:
    for name, (env_name, m, n, h) in batches:
        for algo in args.algos:
            rows = [(variant, train_seconds_per_iteration(algo, env_name, m, n, h,
                                                          args.backend, args.iterations,
                                                          flags))
                    for variant, flags in TRAIN_VARIANTS.items()]
            table = "\n".join(["| algo | flags | s / meta-iteration |", "|---|---|---|"]
                              + [f"| {algo} | {variant} | {seconds:.3f} |"
                                 for variant, seconds in rows])
            print(table)
            harness.record(args, f"`metarl train` on {name}, {algo}",
                           f"M = {m}, N = {n}, H = {h}; {args.iterations} iterations per "
                           "run, median `iteration_s` after the fifth.", table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="iteration")
    parser.add_argument("--algos", nargs="+", default=["promp"], choices=sorted(ALGORITHMS))
    parser.add_argument("--settings", nargs="+", choices=harness.SETTINGS,
                        help="default: every setting in the iteration mode, point-nav in "
                             "the others")
    parser.add_argument("--batch", type=int, nargs=3, metavar=("M", "N", "H"),
                        help="tasks, episodes per task and horizon instead of the settings'")
    parser.add_argument("--backend", default="generalized")
    parser.add_argument("--repeats", type=int, default=5,
                        help="calls timed after the first (iteration, scaling)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1],
                        help="shard the tasks over this many devices, one row each "
                             "(iteration)")
    parser.add_argument("--cpu-devices", type=int,
                        help="split the host CPU into this many devices first, for "
                             "--devices (iteration)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320],
                        help="M of the M sweep (scaling)")
    parser.add_argument("--episodes", type=int, nargs="+", default=[10, 20, 40],
                        help="N of the N sweep (scaling)")
    parser.add_argument("--horizons", type=int, nargs="+", default=[50, 100, 200],
                        help="H of the H sweep (scaling)")
    parser.add_argument("--fuse", type=int, nargs="+", default=[1, 5, 20],
                        help="meta-iterations per call, one row each (fused)")
    parser.add_argument("--iterations", type=int, default=40,
                        help="iterations timed per row (fused) or per run (train; a "
                             "multiple of 5, since iterations_per_call=5 divides it)")
    harness.add_record_arguments(parser)
    args = parser.parse_args()
    if args.cpu_devices:
        if args.mode != "iteration":
            parser.error("--cpu-devices is for the iteration mode (the train mode runs "
                         "with and without it)")
        distributed.split_cpu(args.cpu_devices)

    names = args.settings or (list(harness.SETTINGS) if args.mode == "iteration"
                              else ["point-nav"])
    batches = []
    for name in names:
        env_name, *sizes = harness.SETTINGS[name]
        batches.append((name, (env_name, *(args.batch or sizes))))
    {"iteration": iteration_mode, "scaling": scaling_mode, "fused": fused_mode,
     "train": train_mode}[args.mode](args, batches)


if __name__ == "__main__":
    main()
