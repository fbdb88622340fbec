"""The XLA CPU scheduler work-around set on import (metarl_jax/__init__.py)."""

import os
import subprocess
import sys

import pytest

import metarl_jax

FLAG_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"


def _xla_flags_after_import(xla_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run(
        [sys.executable, "-c", "import os, metarl_jax; print(os.environ['XLA_FLAGS'])"],
        env=env, capture_output=True, text=True, check=True, timeout=60)
    return result.stdout.split()


def test_import_turns_the_concurrency_scheduler_off_and_keeps_other_flags():
    assert _xla_flags_after_import(None) == [metarl_jax.CPU_SCHEDULER_FLAG]
    assert _xla_flags_after_import("--xla_backend_optimization_level=0") == [
        "--xla_backend_optimization_level=0", metarl_jax.CPU_SCHEDULER_FLAG]


def test_a_scheduler_setting_of_the_user_is_left_alone():
    mine = f"--{FLAG_NAME}=true"
    assert _xla_flags_after_import(mine) == [mine]


# The smallest program found to stall under the concurrency-optimised scheduler (JAX
# 0.10.2, 2-core CPU; with `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true`
# it never finishes): GMPS's two rollouts on the generalized ant ring, the second with
# per-task copies of a 2 x 100 ReLU policy, 40 tasks x 20 episodes x 10 steps. The
# second rollout alone, 40 x 2 episodes, tanh, or the spring pipeline do not stall.
STALLING_ROLLOUTS = """
import jax, jax.numpy as jnp
from metarl_jax.envs import make_env
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import collect
env = make_env("ant-goal-ring", backend="generalized")
policy = GaussianPolicy(env.observation_size, env.action_size, (100, 100), "relu")
theta = policy.init(jax.random.PRNGKey(0))
tasks = env.training_tasks(jax.random.PRNGKey(1), 40)
def run(theta, key):
    pre_key, post_key = jax.random.split(key)
    pre = collect(env, policy, theta, tasks, pre_key, 20, 10, per_task_params=False)
    per_task = jax.tree.map(lambda x: jnp.broadcast_to(x, (40,) + x.shape), theta)
    post = collect(env, policy, per_task, tasks, post_key, 20, 10)
    return jnp.mean(pre.rewards) + jnp.mean(post.rewards)
print("finished", float(jax.jit(run)(theta, jax.random.PRNGKey(2))))
"""


@pytest.mark.slow
def test_the_rollouts_that_stalled_the_cpu_runtime_complete():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", STALLING_ROLLOUTS], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout
