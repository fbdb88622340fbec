"""Post-update return of runs over an iteration window, and the lowest 5-iteration
moving average from a given iteration on (how stable a run stays once it has learned).

    python experiments/gmps_stability.py RUN [RUN ...] [--first 80] [--last 100] [--from 40]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics


def stability(run_dir: pathlib.Path, first: int, last: int, start: int, smoothing: int = 5):
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    post = {r["iteration"]: r["post_return"] for r in records}
    window = [post[i] for i in range(first, last + 1) if i in post]
    averages = [statistics.fmean(post[j] for j in range(i - smoothing + 1, i + 1))
                for i in range(max(start, smoothing), max(post) + 1)
                if all(j in post for j in range(i - smoothing + 1, i + 1))]
    return statistics.fmean(window), min(averages)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path)
    parser.add_argument("--first", type=int, default=80)
    parser.add_argument("--last", type=int, default=100)
    parser.add_argument("--from", dest="start", type=int, default=40)
    args = parser.parse_args()
    print(f"| run | post_return, mean of iterations {args.first}–{args.last} | lowest "
          f"5-iteration moving average from iteration {args.start} |\n|---|---|---|")
    for run in args.runs:
        mean, lowest = stability(run, args.first, args.last, args.start)
        print(f"| {run} | {mean:.2f} | {lowest:.2f} |")


if __name__ == "__main__":
    main()
