"""Times one meta-iteration (after compilation) of each chosen algorithm and the rollouts
alone at the same batch, prints a table and appends it to benchmarks/RESULTS.md with the
machine named.

    python benchmarks/meta_iteration.py                       # ProMP, both settings
    python benchmarks/meta_iteration.py --settings point-nav --repeats 20
    python benchmarks/meta_iteration.py --algos promp maml-trpo dice-vpg --settings point-nav
    python benchmarks/meta_iteration.py --backend spring      # Brax backend for Brax tasks

The rollout-only figure samples the same K + 1 phases of M·N·H steps with the same
policy network and no learning: it is the floor a meta-iteration cannot go under.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from metarl_jax import run_config
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax import distributed
from metarl_jax.algorithms.common import broadcast_to_tasks
from metarl_jax.rollout import collect

SETTINGS = {
    # name: (env, M, N, H)
    "point-nav": ("point-nav", 20, 20, 100),
    "halfcheetah-dir": ("halfcheetah-dir", 40, 20, 100),
}
RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on "
            f"{device.platform.upper()} ({getattr(device, 'device_kind', device.platform)})")


def append_results(title: str, method: str, table: str, path=RESULTS) -> None:
    """Appends a "### title, UTC time" block naming the machine, then how the numbers
    were taken (`method`) and the table, to benchmarks/RESULTS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n### {title}, {stamp}\n\nMachine: {machine_description()}. {method}\n\n"
                f"{table}\n")


def timed(fn, *args, repeats: int):
    """(first-call seconds including compilation, median seconds of later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return first, statistics.median(samples)


def bench_setting(algo: str, name: str, backend: str, repeats: int, devices: int = 1) -> dict:
    env_name, meta_batch, episodes, horizon = SETTINGS[name]
    return bench(algo, env_name, meta_batch, episodes, horizon, backend, repeats, name,
                 devices)


def bench(algo: str, env_name: str, meta_batch: int, episodes: int, horizon: int,
          backend: str = "generalized", repeats: int = 5, name: str | None = None,
          devices: int = 1) -> dict:
    """Compile time, seconds per meta-iteration and the rollout-only floor of one setting,
    with the tasks sharded over `devices` devices (as `metarl train` shards them)."""
    name = name or env_name
    run_config = run_config.resolve_config({
        "algo": algo, "env": {"name": env_name, "backend": backend},
        "meta_batch_size": meta_batch, "episodes_per_task": episodes, "horizon": horizon})
    env, policy, algorithm = run_config.build(run_config)
    config = algorithm.config
    sharding = distributed.task_sharding(devices)
    distributed.check_divisible(meta_batch, sharding)
    state = jax.device_put(algorithm.init(jax.random.PRNGKey(0)),
                           distributed.replicated(sharding))

    compile_start = time.perf_counter()
    with distributed.use_task_sharding(sharding):
        compiled = jax.jit(algorithm.meta_iteration).lower(state).compile()
    compile_s = time.perf_counter() - compile_start
    _, per_iteration = timed(lambda s: compiled(s)[1], state, repeats=repeats)
    xla_flops = _xla_flops(compiled)
    model_flops = model_flops_per_iteration(policy, config, algo, algorithm)

    @jax.jit
    def rollouts_only(params, key):
        tasks = distributed.shard_tasks(env.sample_tasks(key, meta_batch))
        per_task = broadcast_to_tasks(params, meta_batch)

        def phase(carry, phase_key):
            batch = collect(env, policy, per_task, tasks, phase_key, episodes, horizon)
            return carry, jnp.sum(batch.rewards)

        return jax.lax.scan(phase, 0.0, jax.random.split(key, config.inner_steps + 1))[1]

    with distributed.use_task_sharding(sharding):  # traced on the first call
        _, rollout_time = timed(rollouts_only, state.params, jax.random.PRNGKey(1),
                                repeats=repeats)
    steps = algorithm.env_steps_per_iteration
    return {"algo": algo, "setting": f"{name} (M={meta_batch}, N={episodes}, H={horizon})",
            "backend": env.backend or "-", "devices": devices, "compile_s": compile_s,
            "iteration_s": per_iteration, "rollout_s": rollout_time,
            "steps_per_s": steps / per_iteration,
            "rollout_share": rollout_time / per_iteration,
            "model_gflops": model_flops / 1e9, "xla_gflops": xla_flops / 1e9,
            "gflops_per_s": model_flops / per_iteration / 1e9,
            "memory_mb": _peak_memory_bytes(compiled) / 2 ** 20}


def _xla_flops(compiled) -> float:
    """XLA's own count for one call (a loop body is counted once, so the rollout scans
    are undercounted; the outer steps, which are not loops, are counted in full)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _peak_memory_bytes(compiled) -> float:
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


def _forward_flops(policy, samples: int) -> float:
    widths = [policy.observation_size, *policy.hidden_sizes, policy.action_size]
    return 2.0 * samples * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def model_flops_per_iteration(policy, config, algo: str, algorithm) -> float:
    """Floating-point operations of one meta-iteration's network work, by the rule of
    thumb: sampling is one forward pass per step; a second-order outer step
    costs about ten forward passes over the pre-update data plus three over the
    post-update data, a first-order one (or an inner step alone) about three over each.
    The P (ProMP), line-search and CG (TRPO) multiples are the algorithm's own."""
    per_phase = config.meta_batch_size * config.episodes_per_task * config.horizon
    pre = config.inner_steps * per_phase
    sampling = _forward_flops(policy, (config.inner_steps + 1) * per_phase)
    inner_steps = 3 * _forward_flops(policy, pre)  # the adaptation between phases
    second_order = getattr(config, "first_order", False) is False
    outer = (10 if second_order else 3) * _forward_flops(policy, pre) \
        + 3 * _forward_flops(policy, per_phase)
    if algo == "promp":
        outer *= config.promp_steps
    elif algo.endswith("-trpo"):
        # gradient + CG iterations of a Gauss-Newton Fisher-vector product (two
        # inner-Hessian products, each 6 passes over the pre data: the tangents of the
        # forward pass, of the backward pass and of the weight gradients; a linearised
        # forward and its transpose over the post data, 4 passes) + one line-search
        # evaluation (the usual case: the first candidate is accepted; the inner step
        # and the post loss, ~4 passes)
        outer += config.cg_iterations * (12 * _forward_flops(policy, pre)
                                         + 4 * _forward_flops(policy, per_phase)) \
            + 3 * _forward_flops(policy, pre) + _forward_flops(policy, per_phase)
    elif algo == "memrl":
        outer = 3 * _forward_flops(policy, pre)  # proximal steps are ordinary PG steps
    return sampling + inner_steps + outer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["promp"], choices=sorted(ALGORITHMS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--backend", default="generalized")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, nargs="+", default=[1],
                        help="shard the tasks over this many devices (one row each)")
    parser.add_argument("--cpu-devices", type=int,
                        help="split the host CPU into this many devices first")
    parser.add_argument("--no-record", action="store_true",
                        help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if args.cpu_devices:
        distributed.split_cpu(args.cpu_devices)

    rows = [bench_setting(algo, name, args.backend, args.repeats, devices)
            for name in args.settings for algo in args.algos for devices in args.devices]
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
    if not args.no_record:
        append_results("Meta-iteration", f"Median of {args.repeats} calls after the first.",
                       table)


if __name__ == "__main__":
    main()
