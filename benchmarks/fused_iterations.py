"""Several meta-iterations per call (`lax.scan` over the iteration) against one per call.

    python benchmarks/fused_iterations.py --algo promp --fuse 1 5 20

Python then gets the metrics of every fused iteration at once, so the trainer could log
them; the question is what the host round-trip between calls costs. Prints a table and
appends it to benchmarks/RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meta_iteration import SETTINGS, append_results  # noqa: E402
from metarl_jax import run_config  # noqa: E402


def seconds_per_iteration(algo: str, setting: str, fuse: int, calls: int) -> float:
    env_name, meta_batch, episodes, horizon = SETTINGS[setting]
    config = run_config.resolve_config({
        "algo": algo, "env": {"name": env_name}, "meta_batch_size": meta_batch,
        "episodes_per_task": episodes, "horizon": horizon})
    _, _, algorithm = run_config.build(config)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="promp")
    parser.add_argument("--setting", default="point-nav", choices=SETTINGS)
    parser.add_argument("--fuse", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--iterations", type=int, default=40,
                        help="iterations timed per row (in calls of --fuse each)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = [(fuse, seconds_per_iteration(args.algo, args.setting, fuse,
                                         max(3, args.iterations // fuse)))
            for fuse in args.fuse]
    base = rows[0][1]
    table = "\n".join(
        ["| algo | setting | iterations per call | s / meta-iteration | vs first row |",
         "|---|---|---|---|---|"]
        + [f"| {args.algo} | {args.setting} | {fuse} | {seconds:.3f} | {seconds / base:.2f} |"
           for fuse, seconds in rows])
    print(table)
    if not args.no_record:
        append_results("Fused meta-iterations", "Median over the calls, per iteration.",
                       table)


if __name__ == "__main__":
    main()
