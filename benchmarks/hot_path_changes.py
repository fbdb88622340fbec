"""Each hot-path change of the CPU speed work against the form it replaced, timed side by side.

    python benchmarks/hot_path_changes.py                 # all changes, 6 rounds
    python benchmarks/hot_path_changes.py --changes fvp --rounds 10

On a shared machine the speed drifts by ±20 % within minutes, so every variant of a
change is compiled in one process and the variants are timed in interleaved rounds
(3 calls each per round); the table gives the median and the fastest call of each, and
the median ratio against the replaced form. The replaced forms are rebuilt here by
patching the library for the duration of one compilation:

- `policy`: the MLP mean as flax's `network.apply` on [N, H, obs] inputs, as
  `mlp_mean` without the column-wise output layer, and as `mlp_mean`;
- `fvp`: MAML-TRPO's Fisher-vector product as the transpose of the whole linearised map
  θ ↦ (μ, log σ) through the inner steps (`gaussian_fisher_vector_product`), against
  the inner Hessians applied on both sides (`MAMLFamily.meta_kl_hvp`);
- `curvature`: TRPO's sᵀAs by one more Fisher-vector product, against CG's residual;
- `promp-kl`: ProMP's LVC inner loss and KL penalty from two forward passes over each
  pre-update batch, against one (`lvc_inner_loss_with_kl`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meta_iteration import SETTINGS, append_results  # noqa: E402

from metarl_jax import losses, optim, policies, run_config  # noqa: E402
from metarl_jax.algorithms import maml  # noqa: E402



@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def flax_distribution(self, params, obs):
    return self.network.apply(params, obs)


def transposed_kl_hvp(self, theta, pre_batches, post_batch):
    """The Fisher-vector product before the change: linearise θ ↦ (μ, log σ) through the
    inner steps and transpose the whole map."""

    def post_distributions(theta):
        def task_distribution(pre, post):
            return self.policy.distribution(self.adapt(theta, pre)[-1], post.observations)

        return jax.vmap(task_distribution)(pre_batches, post_batch)

    return optim.gaussian_fisher_vector_product(post_distributions, theta,
                                                post_batch.log_stds,
                                                self.post_state_weights(post_batch))


CONJUGATE_GRADIENT = optim.conjugate_gradient  # the current one, kept before patching


def conjugate_gradient_then_product(matvec, b, iterations=10, residual_tol=1e-10,
                                    return_residual=False):
    """CG whose residual is recomputed as b − A x: one more product, as rllab spends."""
    x = CONJUGATE_GRADIENT(matvec, b, iterations, residual_tol)
    return (x, b - matvec(x)) if return_residual else x


def lvc_loss_and_kl_separately(policy, params, batch):
    return (losses.lvc_inner_loss(policy, params, batch),
            losses.mean_kl_from_sampler(policy, params, batch))


CHANGES = {
    # change: (algorithms, {variant: patches}); the last variant is the current code.
    "policy": (("promp", "maml-trpo"), {
        "flax `apply` on [N, H, obs]": [(policies.GaussianPolicy, "distribution",
                                         flax_distribution)],
        "flattened samples": [(policies, "COLUMNWISE_OUTPUT_MAX", 0)],
        "flattened + column-wise output": []}),
    "fvp": (("maml-trpo",), {
        "whole map transposed": [(maml.MAMLFamily, "meta_kl_hvp", transposed_kl_hvp)],
        "inner Hessians on both sides": []}),
    "curvature": (("maml-trpo",), {
        "one more product": [(optim, "conjugate_gradient", conjugate_gradient_then_product)],
        "from CG's residual": []}),
    "promp-kl": (("promp",), {
        "two forward passes": [(losses, "lvc_inner_loss_with_kl", lvc_loss_and_kl_separately)],
        "one forward pass": []}),
}


def compile_variant(algo: str, patches) -> tuple:
    env_name, meta_batch, episodes, horizon = SETTINGS["point-nav"]
    run_config = run_config.resolve_config({
        "algo": algo, "env": {"name": env_name}, "meta_batch_size": meta_batch,
        "episodes_per_task": episodes, "horizon": horizon})
    _, _, algorithm = run_config.build(run_config)
    state = algorithm.init(jax.random.PRNGKey(0))
    with contextlib.ExitStack() as stack:
        for obj, name, value in patches:
            stack.enter_context(patched(obj, name, value))
        compiled = jax.jit(algorithm.meta_iteration).lower(state).compile()
    jax.block_until_ready(compiled(state))
    return compiled, state


def interleaved_times(compiled: dict, rounds: int, calls: int = 3) -> dict:
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, (fn, state) in compiled.items():
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(state))
                times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", nargs="+", default=list(CHANGES), choices=CHANGES)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    lines = ["| change | algo | variant | median s / iteration | fastest | × replaced |",
             "|---|---|---|---|---|---|"]
    for change in args.changes:
        algos, variants = CHANGES[change]
        for algo in algos:
            compiled = {name: compile_variant(algo, patches)
                        for name, patches in variants.items()}
            times = interleaved_times(compiled, args.rounds)
            first = statistics.median(times[next(iter(times))])
            for name, samples in times.items():
                median = statistics.median(samples)
                lines.append(f"| {change} | {algo} | {name} | {median:.3f} | "
                             f"{min(samples):.3f} | {median / first:.2f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results("Hot-path changes against the forms they replaced, point-nav "
                       "(M = N = 20, H = 100)",
                       f"One process, one device; {args.rounds} interleaved rounds of 3 "
                       "calls per variant.", table)


if __name__ == "__main__":
    main()
