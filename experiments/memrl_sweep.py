"""Sweep of MEMRL's proximal coefficient λ and inner steps K on point-nav (seed 0, 100
iterations, α = 0.1, plain meta step β = 1), to choose the defaults. Writes
experiments/memrl_sweep.md.

    python experiments/memrl_sweep.py [--lambdas 0.5 1 2] [--steps 1 3 5]
"""

from __future__ import annotations

import argparse
import os
import statistics

from metarl_jax import run_config, trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = []
    for lam in args.lambdas:
        for steps in args.steps:
            config = run_config.resolve_config({
                **run_config.DEFAULT_EXPERIMENT, "algo": "memrl", "seed": args.seed,
                "iterations": args.iterations, "proximal_lambda": lam, "inner_steps": steps,
                "inner_lr": 0.1, "meta_lr": 1.0, "meta_optimizer": "sgd"})
            try:
                history = trainer.train(config, progress=False).history
                window = [r for r in history if r["iteration"] > 0.8 * args.iterations]
                post = statistics.fmean(r["post_return"] for r in window)
                pre = statistics.fmean(r["pre_return"] for r in window)
                steps_total = history[-1]["env_steps"]
            except trainer.TrainingDiverged:
                post = pre = float("nan")
                steps_total = 0
            rows.append((lam, steps, pre, post, steps_total))
            print(rows[-1], flush=True)

    lines = ["| λ | K | pre_return | post_return | env steps |", "|---|---|---|---|---|"]
    lines += [f"| {lam} | {k} | {pre:.2f} | {post:.2f} | {total:,} |"
              for lam, k, pre, post, total in rows]
    best = max((r for r in rows if r[3] == r[3]), key=lambda r: r[3])
    text = "\n".join(lines) + (f"\n\nBest post_return: λ = {best[0]}, K = {best[1]} "
                               f"({best[3]:.2f}).\n")
    print(text)
    with open(os.path.join(HERE, "memrl_sweep.md"), "w") as f:
        f.write("# MEMRL sweep on point-nav\n\n`python experiments/memrl_sweep.py`: seed "
                f"{args.seed}, {args.iterations} iterations, M = 20, N = 20, H = 100, α = 0.1, "
                "β = 1 (plain SGD meta step); mean over the last 20 % of iterations; "
                "2-core CPU.\n\n" + text)


if __name__ == "__main__":
    main()
