"""The ProMP paper's gradient-variance study: relative standard deviation of the
meta-gradient for the LVC and DiCE estimators along training on point-nav.

A run of `lvc-vpg` is trained (checkpoint every 10 iterations). At each checkpoint's θ,
both estimators' meta-gradients are computed on `--resamples` independently re-sampled
meta-batches (the same tasks and episodes for both estimators in each resample, each
with its own advantages: normalised GAE for LVC, γ^t r_t − b_t for DiCE). For each
parameter, relative std = std over resamples / |mean over resamples|; the table reports
its mean (as the paper) and its median over parameters.

    python experiments/gradient_variance.py --out runs/gradient_variance
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from metarl_jax import run_config, trainer
from metarl_jax.algorithms.common import sample_adaptation_phases
from metarl_jax.checkpoints import Checkpointer

HERE = os.path.dirname(os.path.abspath(__file__))


def meta_gradient_fn(algorithm):
    """(θ, key) ↦ flat meta-gradient of `algorithm` on a freshly sampled meta-batch."""
    c = algorithm.config

    def gradient(theta, key):
        task_key, sample_key = jax.random.split(key)
        tasks = algorithm.env.sample_tasks(task_key, c.meta_batch_size)
        pre, post = sample_adaptation_phases(algorithm.env, algorithm.policy, c, theta, tasks,
                                             sample_key, algorithm.inner_loss,
                                             algorithm.process)
        grads = jax.grad(lambda t: algorithm.meta_loss(t, pre, post)[0])(theta)
        return ravel_pytree(grads)[0]

    return jax.jit(jax.vmap(gradient, in_axes=(None, 0)))


def relative_std(gradients: np.ndarray) -> tuple[float, float]:
    ratio = gradients.std(axis=0, ddof=1) / np.maximum(np.abs(gradients.mean(axis=0)), 1e-12)
    return float(ratio.mean()), float(np.median(ratio))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gradient_variance")
    parser.add_argument("--env", default="point-nav")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dice-baseline", action="store_true",
                        help="DiCE on γ^t r_t without the linear baseline")
    args = parser.parse_args()

    base = {**run_config.DEFAULT_EXPERIMENT, "env": {"name": args.env}, "seed": args.seed,
            "iterations": args.iterations, "checkpoint_every": 10,
            "keep_checkpoints": args.iterations // 10 + 1}
    lvc_config = run_config.resolve_config({**base, "algo": "lvc-vpg"})
    if not os.path.exists(os.path.join(args.out, "checkpoints", str(args.iterations))):
        trainer.train(lvc_config, args.out, force=True, progress=True)

    estimators = {name: run_config.build(run_config.resolve_config(
        {**base, "algo": name,
         **({"dice_baseline": not args.no_dice_baseline} if name == "dice-vpg" else {})}))[2]
        for name in ("lvc-vpg", "dice-vpg")}
    gradient_fns = {name: meta_gradient_fn(a) for name, a in estimators.items()}
    checkpointer = Checkpointer(os.path.join(args.out, "checkpoints"))
    template = estimators["lvc-vpg"].init(jax.random.PRNGKey(0))
    iterations = [0] + checkpointer.all_iterations()

    rows = []
    for iteration in iterations:
        theta = (template.params if iteration == 0 else
                 checkpointer.restore(template, iteration)[0].params)
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), iteration),
                                args.resamples)
        row = {"iteration": iteration}
        for name, fn in gradient_fns.items():
            row[name] = relative_std(np.asarray(fn(theta, keys)))
        row["ratio"] = row["dice-vpg"][0] / row["lvc-vpg"][0]
        rows.append(row)
        print(row, flush=True)
    checkpointer.close()

    table = ["| iteration | LVC rel. std (mean / median) | DiCE rel. std (mean / median) | "
             "DiCE / LVC (means) |", "|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['iteration']} | {r['lvc-vpg'][0]:.2f} / {r['lvc-vpg'][1]:.2f} | "
                     f"{r['dice-vpg'][0]:.2f} / {r['dice-vpg'][1]:.2f} | {r['ratio']:.2f} |")
    mean_ratio = statistics.fmean(r["ratio"] for r in rows)
    text = "\n".join(table) + f"\n\nMean DiCE / LVC ratio over the checkpoints: {mean_ratio:.2f}\n"
    print(text)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    suffix = "_no_dice_baseline" if args.no_dice_baseline else ""
    with open(os.path.join(HERE, f"gradient_variance{suffix}.md"), "w") as f:
        f.write(f"# Meta-gradient relative standard deviation, {args.env}\n\n"
                f"`python experiments/gradient_variance.py"
                f"{' --no-dice-baseline' if suffix else ''}` ({stamp}; lvc-vpg run, seed "
                f"{args.seed}, {args.resamples} re-sampled meta-batches of M = 20 tasks × "
                f"N = 20 episodes per checkpoint; CPU).\n\n{text}")


if __name__ == "__main__":
    main()
