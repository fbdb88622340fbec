"""Summarise runs: mean pre/post-update return over an iteration window, per run and
across runs, as a Markdown table.

    python experiments/summarize.py runs/promp_point_nav_seed* --first 80 --last 100
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics


def window_means(run_dir: pathlib.Path, first: int, last: int,
                 at_steps: int | None = None) -> dict:
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    if at_steps is not None:  # the last 20 % of the budget, whatever the iteration size
        window = [r for r in records if 0.8 * at_steps < r["env_steps"] <= at_steps]
    else:
        window = [r for r in records if first <= r["iteration"] <= last]
    if not window:
        raise SystemExit(f"{run_dir}: no iterations in [{first}, {last}]")
    pre = statistics.fmean(r["pre_return"] for r in window)
    post = statistics.fmean(r["post_return"] for r in window)
    return {"run": str(run_dir), "pre": pre, "post": post, "gain": post - pre,
            "env_steps": window[-1]["env_steps"], "time_s": window[-1]["time_s"],
            "records": records}


def steps_to_threshold(records: list, threshold: float, smoothing: int = 5):
    """Meta-training env steps at the first iteration whose post_return, averaged over
    the last `smoothing` iterations, reaches `threshold` (None if never)."""
    for index in range(len(records)):
        recent = records[max(0, index - smoothing + 1):index + 1]
        if statistics.fmean(r["post_return"] for r in recent) >= threshold:
            return records[index]["env_steps"], records[index].get("expert_env_steps", 0)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path)
    parser.add_argument("--first", type=int, default=80)
    parser.add_argument("--last", type=int, default=100)
    parser.add_argument("--at-steps", type=int, help="window: env steps in (0.8·S, S] "
                        "instead of iterations (to compare at equal sample budgets)")
    parser.add_argument("--threshold", type=float,
                        help="also report the env steps to reach this post_return "
                             "(5-iteration moving average)")
    args = parser.parse_args()
    rows = [window_means(run, args.first, args.last, args.at_steps) for run in args.runs]
    print("| run | pre_return | post_return | post − pre | env steps | wall time (s) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['pre']:.2f} | {r['post']:.2f} | {r['gain']:.2f} | "
              f"{r['env_steps']:,} | {r['time_s']:.0f} |")
    if len(rows) > 1:
        print(f"| mean of {len(rows)} | {statistics.fmean(r['pre'] for r in rows):.2f} | "
              f"{statistics.fmean(r['post'] for r in rows):.2f} | "
              f"{statistics.fmean(r['gain'] for r in rows):.2f} | | |")
    if args.threshold is not None:
        print(f"\n| run | meta-training env steps to post_return ≥ {args.threshold} | "
              "expert env steps |\n|---|---|---|")
        for r in rows:
            reached = steps_to_threshold(r["records"], args.threshold)
            steps = f"{reached[0]:,}" if reached else "not reached"
            expert = f"{reached[1]:,}" if reached else "-"
            print(f"| {r['run']} | {steps} | {expert} |")


if __name__ == "__main__":
    main()
