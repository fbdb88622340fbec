"""Seconds per meta-iteration through `metarl train`, with and without the speed flags.

    python benchmarks/train_timing.py --algo promp --iterations 40
    python benchmarks/train_timing.py --algo maml-trpo --iterations 20

Each variant is one `metarl train` run (point-nav, M = N = 20, H = 100) in a fresh
process; the figure is the median `iteration_s` of its records after the fifth. Prints a
table and appends it to benchmarks/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meta_iteration import append_results  # noqa: E402

VARIANTS = {
    "none": [],
    "`--cpu-devices 2`": ["--cpu-devices", "2"],
    "`--set iterations_per_call=5`": ["--set", "iterations_per_call=5"],
    "`--cpu-devices 2 --set iterations_per_call=5`": ["--cpu-devices", "2", "--set",
                                                      "iterations_per_call=5"],
}


def seconds_per_iteration(algo: str, iterations: int, flags: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "metarl_jax.cli", "train", "--algo", algo,
                        "--env", "point-nav", "--iterations", str(iterations), "--set",
                        f"checkpoint_every={iterations}", "--out", out, "--force", "--quiet",
                        *flags], check=True, capture_output=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return statistics.median(r["iteration_s"] for r in records[5:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="promp")
    parser.add_argument("--iterations", type=int, default=40,
                        help="a multiple of 5 (iterations_per_call divides it)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = [(name, seconds_per_iteration(args.algo, args.iterations, flags))
            for name, flags in VARIANTS.items()]
    table = "\n".join(["| algo | flags | s / meta-iteration |", "|---|---|---|"]
                      + [f"| {args.algo} | {name} | {seconds:.3f} |" for name, seconds in rows])
    print(table)
    if not args.no_record:
        append_results(f"`metarl train` on point-nav, {args.algo}",
                       f"{args.iterations} iterations per run, median `iteration_s` after "
                       "the fifth.", table)


if __name__ == "__main__":
    main()
