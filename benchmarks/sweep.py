"""S seeds as one compiled sweep against S separate runs, as a user runs them.

Each measurement is one `metarl train` process (no persistent compilation cache, the
default): `--seeds 0-(S-1)` for the sweep, and S processes one after another with
`--seed i` for the separate runs. Reported: wall time including start-up and
compilation, and the steady seconds per iteration (median of `iteration_s` after the
first five iterations; for the sweep, one iteration of every member).

    python benchmarks/sweep.py --algos promp maml-trpo --seeds 1 2 4 8 --iterations 20
    python benchmarks/sweep.py --algos promp --seeds 3 --iterations 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from harness import add_record_arguments, record


def metarl(*args: str) -> float:
    """Runs `metarl train ARGS` and returns its wall time."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "metarl_jax.cli", "train", "--quiet", *args],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def steady_iteration_s(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [json.loads(line)["iteration_s"] for line in f]
    return statistics.median(times[5:] or times)


def bench(algo: str, seeds: int, iterations: int, work: str) -> list[dict]:
    common = ["--algo", algo, "--env", "point-nav", "--iterations", str(iterations),
              "--force"]
    out = os.path.join(work, f"{algo}_sweep{seeds}")
    sweep_wall = metarl(*common, "--seeds", f"0-{seeds - 1}", "--out", out)
    sweep_iteration = steady_iteration_s(os.path.join(out, "seed0"))
    separate_wall, separate_iteration = 0.0, []
    for seed in range(seeds):
        run = os.path.join(work, f"{algo}_seed{seed}")
        separate_wall += metarl(*common, "--seed", str(seed), "--out", run)
        separate_iteration.append(steady_iteration_s(run))
    return [{"algo": algo, "runs": seeds, "mode": "one sweep", "wall_s": sweep_wall,
             "iteration_s": sweep_iteration},
            {"algo": algo, "runs": seeds, "mode": "separate runs", "wall_s": separate_wall,
             "iteration_s": sum(separate_iteration)}]


def format_table(rows: list[dict], iterations: int) -> str:
    lines = [f"| algo | runs S | how | wall time, {iterations} iterations (s) | "
             "s per iteration of all S runs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['runs']} | {r['mode']} | {r['wall_s']:.1f} | "
                     f"{r['iteration_s']:.3f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["promp", "maml-trpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--iterations", type=int, default=20)
    add_record_arguments(parser)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for algo in args.algos:
            for seeds in args.seeds:
                rows += bench(algo, seeds, args.iterations, work)
                print(format_table(rows[-2:], args.iterations), flush=True)
    table = format_table(rows, args.iterations)
    print(table)
    record(args, "Seeds as one sweep against separate runs (point-nav, published setting "
           "M = N = 20, H = 100)",
           f"`python benchmarks/sweep.py --algos {' '.join(args.algos)} --seeds "
           f"{' '.join(map(str, args.seeds))} --iterations {args.iterations}`: each a "
           "`metarl train` process without a persistent compilation cache; wall time "
           "includes start-up and compilation.", table)


if __name__ == "__main__":
    main()
