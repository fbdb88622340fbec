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
  θ ↦ (μ, log σ) through the inner steps (`gaussian_fisher_vector_product`,
  here), against the inner Hessians applied on both sides (`MAMLFamily.meta_kl_hvp`);
- `curvature`: TRPO's sᵀAs by one more Fisher-vector product, against CG's residual;
- `promp-kl`: ProMP's LVC inner loss and KL penalty from two forward passes over each
  pre-update batch, against one (`lvc_inner_loss_with_kl`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Callable

import jax
from jax.flatten_util import ravel_pytree

import harness
from metarl_jax import losses, optim, policies
from metarl_jax.algorithms import maml


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


def gaussian_fisher_vector_product(distribution_fn: Callable, params, old_log_stds: jax.Array,
                                   weights: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """v ↦ Jᵀ F J v at the sampling parameters: J the Jacobian of
    params ↦ (μ, log σ) over the states, linearised once, and F the Gaussian Fisher
    information times the state weights `weights` (`optim.gaussian_fisher_diagonal`).

    Args:
      distribution_fn: params ↦ (means, log_stds), each [..., A].
      old_log_stds: the sampling distribution's log σ, [..., A].
      weights: [...], the state weights (a mean over states: masks / count).
    """
    _, unravel = ravel_pytree(params)
    _, linear = jax.linearize(distribution_fn, params)
    transpose = jax.linear_transpose(linear, params)
    mean_precision, log_std_precision = optim.gaussian_fisher_diagonal(old_log_stds, weights)

    def product(v):
        d_mean, d_log_std = linear(unravel(v))
        (pulled_back,) = transpose((mean_precision * d_mean, log_std_precision * d_log_std))
        return ravel_pytree(pulled_back)[0]

    return product


def transposed_kl_hvp(self, theta, pre_batches, post_batch):
    """The Fisher-vector product before the change: linearise θ ↦ (μ, log σ) through the
    inner steps and transpose the whole map."""

    def post_distributions(theta):
        def task_distribution(pre, post):
            return self.policy.distribution(self.adapt(theta, pre)[-1], post.observations)

        return jax.vmap(task_distribution)(pre_batches, post_batch)

    return gaussian_fisher_vector_product(post_distributions, theta, post_batch.log_stds,
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


def compile_variant(algo: str, patches, batch: tuple[int, int, int]) -> Callable:
    """One meta-iteration of `algo` on point-nav compiled with `patches` applied, as a
    call without arguments (run once here)."""
    env_name = harness.SETTINGS["point-nav"][0]
    _, _, algorithm = harness.build_algorithm(algo, env_name, *batch)
    state = algorithm.init(jax.random.PRNGKey(0))
    with contextlib.ExitStack() as stack:
        for obj, name, value in patches:
            stack.enter_context(patched(obj, name, value))
        compiled = jax.jit(algorithm.meta_iteration).lower(state).compile()
    jax.block_until_ready(compiled(state))
    return lambda: compiled(state)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", nargs="+", default=list(CHANGES), choices=CHANGES)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, nargs=3, metavar=("M", "N", "H"),
                        default=harness.SETTINGS["point-nav"][1:],
                        help="tasks, episodes per task and horizon (default: %(default)s)")
    harness.add_record_arguments(parser)
    args = parser.parse_args()

    lines = ["| change | algo | variant | median s / iteration | fastest | × replaced |",
             "|---|---|---|---|---|---|"]
    for change in args.changes:
        algos, variants = CHANGES[change]
        for algo in algos:
            compiled = {name: compile_variant(algo, patches, tuple(args.batch))
                        for name, patches in variants.items()}
            times = harness.interleaved(compiled, args.rounds, calls=3)
            first = statistics.median(times[next(iter(times))])
            for name, samples in times.items():
                median = statistics.median(samples)
                lines.append(f"| {change} | {algo} | {name} | {median:.3f} | "
                             f"{min(samples):.3f} | {median / first:.2f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    m, n, h = args.batch
    harness.record(args, "Hot-path changes against the forms they replaced, point-nav "
                   f"(M = {m}, N = {n}, H = {h})",
                   f"One process, one device; {args.rounds} interleaved rounds of 3 calls "
                   "per variant.", table)


if __name__ == "__main__":
    main()
