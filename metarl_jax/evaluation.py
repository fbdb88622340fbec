"""Adaptation on held-out tasks: the return after 0, 1, …, K adaptation steps."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from metarl_jax.checkpoints import Checkpointer
from metarl_jax.run_config import build
from metarl_jax.run_dir import CHECKPOINT_DIR, EVAL_FILE, load_run_config

# Evaluation draws its tasks from a key stream disjoint from training's, so the tasks
# are fresh draws (held out) even for the training seed.
EVAL_STREAM = 0x5EED_E7A1


def evaluate(run_dir: str, num_tasks: int = 40, adapt_steps: int | None = None,
             seed: int = 0, episodes_per_task: int | None = None,
             iteration: int | None = None, write: bool = True) -> dict:
    """Adapts the run's saved meta-policy on `num_tasks` new tasks with the algorithm's
    own adaptation and reports, after 0, 1, …, `adapt_steps` steps (default: the run's
    `inner_steps`), the mean over tasks of each task's mean episode return with its
    standard error (`return_mean`, `return_stderr`: every task weighs alike), and the
    mean over all episodes pooled (`return_pooled`: the measure of the training's
    `pre_return` / `post_return`, in which a task whose bodies fall often, and so has
    many short episodes, weighs more; equal to `return_mean` where episodes never end
    early), with the episodes per task (`episodes_per_task_mean`).

    Writes `run_dir/eval.json` when `write`. Returns the same dictionary.
    """
    config = load_run_config(run_dir)
    adapt_steps = config.algorithm.inner_steps if adapt_steps is None else adapt_steps
    episodes = episodes_per_task or config.algorithm.episodes_per_task
    if num_tasks < 1 or adapt_steps < 0 or episodes < 1:
        raise ValueError("evaluate: need tasks >= 1, adapt steps >= 0, episodes >= 1")
    _, _, algorithm = build(config)
    iteration, state, host = restore_meta_state(run_dir, algorithm, iteration)

    key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
    adapt = jax.jit(algorithm.adaptation_returns, static_argnums=(2, 3, 4))
    returns = jax.device_get(adapt(state.params, key, num_tasks, adapt_steps, episodes))
    per_task = np.asarray(returns.task_means)
    means = per_task.mean(axis=0)
    stderrs = (per_task.std(axis=0, ddof=1) / math.sqrt(num_tasks) if num_tasks > 1
               else np.zeros_like(means))
    result = {
        "run": os.path.abspath(run_dir), "algo": config.run.algo, "env": config.run.env.name,
        "checkpoint_iteration": int(iteration), "env_steps": int(host["env_steps"]),
        "tasks": num_tasks, "episodes_per_task": episodes, "seed": seed,
        "adapt_steps": list(range(adapt_steps + 1)),
        "return_mean": [float(m) for m in means],
        "return_stderr": [float(s) for s in stderrs],
        "return_pooled": [float(m) for m in np.asarray(returns.pooled_mean())],
        "episodes_per_task_mean": [float(n) for n in np.asarray(returns.episodes).mean(0)],
    }
    if write:
        with open(os.path.join(run_dir, EVAL_FILE), "w") as f:
            json.dump(result, f, indent=2)
    return result


def restore_meta_state(run_dir: str, algorithm, iteration: int | None = None):
    """(iteration, state, host state) of the run's checkpoint at `iteration`, default the
    newest intact one, restored into `algorithm`'s state layout."""
    checkpointer = Checkpointer(os.path.join(run_dir, CHECKPOINT_DIR))
    try:
        template = algorithm.init(jax.random.PRNGKey(0))
        if iteration is None:
            found = checkpointer.restore_latest_intact(template)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
            return found
        state, host = checkpointer.restore(template, iteration)
        return iteration, state, host
    finally:
        checkpointer.close()


def format_table(result: dict) -> str:
    lines = ["adapt step  return: mean over tasks ± s.e.   episodes pooled   episodes/task"]
    for step, mean, stderr, pooled, count in zip(
            result["adapt_steps"], result["return_mean"], result["return_stderr"],
            result["return_pooled"], result["episodes_per_task_mean"]):
        lines.append(f"{step:>10}  {mean:20.3f} ± {stderr:<8.3f}  {pooled:15.3f}  {count:13.1f}")
    return "\n".join(lines)
