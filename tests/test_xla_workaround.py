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


# A split host CPU: every device shares XLA's intra-op pool, and jaxlib's batched LAPACK
# kernels block a pool thread until their chunks, queued on the same pool, are done
# (metarl_jax/__init__.py). `split_cpu` sizes the pool to the cores plus one thread per
# device.
POOL_AFTER_SPLIT = """
import os, sys
from metarl_jax import distributed
distributed.split_cpu(int(sys.argv[1]))
import jax
jax.jit(lambda x: x + 1)(1.0).block_until_ready()
threads = [open(f"/proc/self/task/{t}/comm").read().strip()
           for t in os.listdir("/proc/self/task")]
print(os.environ.get("PJRT_NPROC"), sum(name == "tf_XLAEigen" for name in threads))
"""


def _without_pool_settings(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PJRT_NPROC", "NPROC", "JAX_NUM_CPU_DEVICES")}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "host_platform_device_count" not in f)
    return {**env, **extra}


def _pool_after_split(devices, env):
    result = subprocess.run([sys.executable, "-c", POOL_AFTER_SPLIT, str(devices)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    setting, threads = result.stdout.split()
    return setting, int(threads)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux thread names")
def test_a_split_cpu_gets_one_more_pool_thread_per_device():
    cores = metarl_jax.host_cores()
    assert _pool_after_split(2, _without_pool_settings()) == (str(cores + 2), cores + 2)
    assert _pool_after_split(1, _without_pool_settings()) == ("None", cores)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux thread names")
def test_a_pool_size_of_the_user_is_left_alone():
    assert _pool_after_split(2, _without_pool_settings(NPROC="3")) == ("None", 3)


def test_devices_split_through_the_environment_get_the_threads_too():
    cores = metarl_jax.host_cores()
    script = "import os, metarl_jax; print(os.environ.get('PJRT_NPROC'))"
    for extra, expected in (
            ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, str(cores + 4)),
            ({"JAX_NUM_CPU_DEVICES": "3"}, str(cores + 3)),
            ({}, "None")):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                env=_without_pool_settings(**extra), text=True, check=True,
                                timeout=60)
        assert result.stdout.strip() == expected, extra


# The smallest program found to stall on a CPU split in two (JAX 0.10.2, 2 cores; with
# the pool left at the cores, PJRT_NPROC=2 here, it stops using CPU within seconds of
# the compile and never finishes): one rollout of the generalized half-cheetah, 2 tasks
# x 300 episodes x 2 steps, tasks sharded over the two devices. Each device's mass-matrix
# solve is a batch of 300 triangular solves, enough for jaxlib to split it over the pool.
# With 2 x 8 episodes, or one device, it is solved in place and never stalled.
SPLIT_CPU_ROLLOUT = """
from metarl_jax import distributed
distributed.split_cpu(2)
import jax, jax.numpy as jnp
from metarl_jax.envs import make_env
from metarl_jax.policies import GaussianPolicy
from metarl_jax.rollout import collect
env = make_env("halfcheetah-dir", backend="generalized")
policy = GaussianPolicy(env.observation_size, env.action_size, (64, 64), "tanh")
theta = policy.init(jax.random.PRNGKey(0))
tasks = env.training_tasks(jax.random.PRNGKey(1), 2)
sharding = distributed.task_sharding(2)
def run(theta, key):
    with distributed.use_task_sharding(sharding):
        batch = collect(env, policy, theta, distributed.shard_tasks(tasks), key, 300, 2,
                        per_task_params=False)
    return jnp.mean(batch.rewards)
print("finished", float(jax.jit(run)(theta, jax.random.PRNGKey(2))))
"""


@pytest.mark.slow
def test_a_rollout_sharded_over_a_split_cpu_completes():
    result = subprocess.run([sys.executable, "-c", SPLIT_CPU_ROLLOUT],
                            env=_without_pool_settings(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout
