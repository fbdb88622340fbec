"""GMPS's imitation Adam steps on one batch: the loss and the largest importance weight.

    python experiments/gmps_imitation_probe.py [KEY=VALUE ...]

Uses the 8 dense-ring experts that `compare_gmps_ant_ring_sparse.sh` writes to
runs/ring/demos_dense8.npz, at that script's reduced scale (8 goals, M = 8, N = 10,
H = 100, spring) with the paper's 500 steps; the arguments override config keys.
"""

import sys

import jax
import jax.numpy as jnp
import optax

from metarl_jax import run_config
from metarl_jax.algorithms.common import standard_advantages
from metarl_jax.config import load_yaml, merge, parse_overrides
from metarl_jax.rollout import collect

REDUCED = ["env.backend=spring", "meta_batch_size=8", "episodes_per_task=10", "horizon=100",
           "gmps.num_train_tasks=8", "gmps.demos=runs/ring/demos_dense8.npz"]


def main():
    raw = merge(load_yaml("experiments/gmps_ant_goal_ring.yaml"),
                parse_overrides([*REDUCED, *sys.argv[1:]]))
    env, _, gmps = run_config.build(run_config.resolve_config(raw))
    policy, config = gmps.policy, gmps.config  # the meta-policy (bias-transformed)
    state = gmps.prepare(gmps.init(jax.random.PRNGKey(0)))

    @jax.jit
    def imitation_steps(state):
        batch = standard_advantages(
            collect(env, policy, state.params["policy"], state.train_tasks,
                    jax.random.PRNGKey(5), config.episodes_per_task, config.horizon,
                    per_task_params=False), config)
        observations, labels, weights = gmps.expert_data(
            state, jnp.arange(config.gmps.num_train_tasks))

        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(gmps.outer_loss)(
                params, batch, observations, labels, weights)
            log_probs = policy.log_prob(params["policy"], batch.observations, batch.actions)
            largest_log_weight = jnp.max(
                jnp.where(batch.masks > 0, log_probs - batch.log_probs, -jnp.inf))
            updates, opt_state = gmps.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, largest_log_weight)

        _, history = jax.lax.scan(step, (state.params, state.opt_state), None,
                                  length=config.gmps.imitation_steps)
        return history

    losses, largest_log_weights = jax.device_get(imitation_steps(state))
    last = len(losses) - 1
    for i in sorted({0, 10, 50, 100, 200, 300, 400, last} & set(range(last + 1))):
        print(f"step {i}: imitation loss {losses[i]:.4g}, "
              f"log of the largest importance weight {largest_log_weights[i]:.3g}")


if __name__ == "__main__":
    main()
