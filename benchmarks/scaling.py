"""Scaling study: seconds per meta-iteration against the number of tasks M, the episodes
per task N and the horizon H, with the rollout-only floor, on whatever device JAX sees.
Prints a table and appends it to benchmarks/RESULTS.md with the machine named.

    python benchmarks/scaling.py                       # ProMP on point-nav
    python benchmarks/scaling.py --algo maml-trpo --tasks 10 20 40 80
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meta_iteration import append_results, bench  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="promp")
    parser.add_argument("--env", default="point-nav")
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320])
    parser.add_argument("--episodes", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--horizons", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    sweeps = {"M": [(m, 20, 100) for m in sorted(set(args.tasks) | {20})],
              "N": [(20, n, 100) for n in sorted(set(args.episodes) | {20})],
              "H": [(20, 20, h) for h in sorted(set(args.horizons) | {100})]}
    measured: dict = {}
    lines = ["| sweep | M | N | H | s / meta-iteration | rollouts alone (s) | "
             "× per doubling | env steps / s |", "|---|---|---|---|---|---|---|---|"]
    for sweep, sizes in sweeps.items():
        previous = None
        for m, n, h in sizes:
            if (m, n, h) not in measured:
                measured[(m, n, h)] = bench(args.algo, args.env, m, n, h,
                                            repeats=args.repeats)
                print(m, n, h, f"{measured[(m, n, h)]['iteration_s']:.3f}", flush=True)
            row = measured[(m, n, h)]
            size = {"M": m, "N": n, "H": h}[sweep]
            growth = ""
            if previous is not None:
                last_size, last_time = previous
                ratio = row["iteration_s"] / last_time
                growth = f"{ratio ** (1 / math.log2(size / last_size)):.2f}"
            previous = (size, row["iteration_s"])
            lines.append(f"| {sweep} | {m} | {n} | {h} | {row['iteration_s']:.3f} | "
                         f"{row['rollout_s']:.3f} | {growth} | {row['steps_per_s']:,.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results(f"Scaling, {args.algo} on {args.env}",
                       f"Median of {args.repeats} calls after the first; one size varied per "
                       "sweep from M = 20, N = 20, H = 100; growth is the time ratio per "
                       "doubling against the previous row of the sweep (1.0: free, 2.0: "
                       "linear).", table)


if __name__ == "__main__":
    main()
