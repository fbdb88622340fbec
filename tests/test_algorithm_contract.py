"""Every registered algorithm against the contract of `metarl_jax.algorithms.base`.

Each algorithm runs on a tiny point-nav setting through the same checks: one compiled
iteration reports the required metrics; its state keeps its shapes, so nothing
recompiles; meta-test adaptation has the documented shape; a checkpoint round trip
resumes to the same numbers; and two devices give the numbers of one, with the work
split between them (for the other MAML compositions in `make test-slow`). A new algorithm that misses a piece fails here, by name.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from metarl_jax import run_config, run_dir, trainer
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.algorithms.base import (REQUIRED_METRICS, AdaptationReturns, MetaLearner,
                                        MetaState, check_algorithm)
from metarl_jax.config import SamplingConfig

TINY = {"env": {"name": "point-nav"}, "meta_batch_size": 2, "episodes_per_task": 2,
        "horizon": 8, "hidden_sizes": [8, 8]}
# GMPS trains its experts in `prepare`: two PPO updates for two tasks.
PER_ALGORITHM = {"gmps": {"gmps": {"num_train_tasks": 2, "expert_iterations": 2,
                                   "expert_hidden_sizes": [8, 8], "imitation_steps": 2,
                                   "demo_buffer_size": 80, "dagger_every": 1,
                                   "dagger_buffer_size": 16}}}
TIMING_KEYS = {"time_s", "iteration_s"}


def tiny_raw(algo: str, **overrides) -> dict:
    return {**TINY, "algo": algo, **PER_ALGORITHM.get(algo, {}), **overrides}


_traces = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: _traces.append(name)
    if name == "/jax/core/compile/jaxpr_trace_duration" else None)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_algorithm_meets_the_contract(algo, tmp_path):
    cls = ALGORITHMS[algo]
    assert check_algorithm(cls) is cls and issubclass(cls.config_class, SamplingConfig)
    config = run_config.resolve_config(tiny_raw(algo, iterations=3, checkpoint_every=1,
                                                keep_checkpoints=3))
    _, _, algorithm = run_config.build(config)
    assert isinstance(algorithm, MetaLearner)

    # The state is a MetaState whose shapes and dtypes one iteration keeps.
    state = algorithm.init(jax.random.PRNGKey(0))
    assert isinstance(state, MetaState), f"{algo}: init must return a MetaState"
    after, metrics = jax.eval_shape(algorithm.meta_iteration, state)
    before_leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, x), y in zip(before_leaves, jax.tree.leaves(after)):
        assert (np.shape(x), jax.numpy.result_type(x)) == (y.shape, y.dtype), (
            f"{algo}: meta_iteration changes {jax.tree_util.keystr(path)}")
    assert jax.tree.structure(after) == jax.tree.structure(state)
    missing = [name for name in REQUIRED_METRICS if name not in metrics]
    assert not missing, f"{algo}: meta_iteration does not report {missing}"

    # Three iterations: the required metrics are finite, nothing is traced after the
    # first call.
    out = tmp_path / "run"
    traces_at = []
    history = trainer.train(config, str(out), progress=False,
                            on_iteration=lambda _: traces_at.append(len(_traces))).history
    assert [r["iteration"] for r in history] == [1, 2, 3]
    assert len(set(traces_at)) == 1, f"{algo}: traced again after the first call"
    for record in history:
        for name in REQUIRED_METRICS:
            assert np.isfinite(record[name]), (algo, name, record[name])
    assert history[-1]["env_steps"] == 3 * algorithm.env_steps_per_iteration

    # Resume from the checkpoint of iteration 2: iteration 3 again, the same numbers.
    shutil.rmtree(out / run_dir.CHECKPOINT_DIR / "3")
    resumed = trainer.train(config, str(out), resume=True, progress=False)
    (again,) = resumed.history
    assert {k: v for k, v in again.items() if k not in TIMING_KEYS} == {
        k: v for k, v in history[-1].items() if k not in TIMING_KEYS}, algo
    assert [r["iteration"] for r in run_dir.read_metrics(str(out))] == [1, 2, 3]

    # Meta-test adaptation: [tasks, steps + 1] finite returns, each over at least one
    # episode per lane.
    adapt = jax.jit(algorithm.adaptation_returns, static_argnums=(2, 3, 4))
    returns = jax.device_get(adapt(resumed.state.params, jax.random.PRNGKey(1), 2, 1, 2))
    assert isinstance(returns, AdaptationReturns), algo
    assert returns.task_means.shape == returns.episodes.shape == (2, 2), algo
    assert np.all(np.isfinite(returns.task_means)), (algo, returns)
    assert np.all(returns.episodes >= 2), (algo, returns)


def test_the_contract_names_what_an_algorithm_lacks():
    class NoName(MetaLearner):
        config_class = SamplingConfig

        def init(self, key): ...

        def meta_iteration(self, state): ...

        def adaptation_returns(self, *args): ...

    with pytest.raises(TypeError, match="NoName: set the class attribute `name`"):
        check_algorithm(NoName)

    class NoAdaptation(MetaLearner):
        name = "no-adaptation"
        config_class = SamplingConfig

        def init(self, key): ...

        def meta_iteration(self, state): ...

    with pytest.raises(TypeError, match="NoAdaptation: implement adaptation_returns"):
        check_algorithm(NoAdaptation)


TWO_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    from metarl_jax import distributed, programs, run_config, trainer
    assert len(jax.devices()) == 2, jax.devices()
    config = run_config.resolve_config({**json.loads(sys.argv[1]), "iterations": 1})
    _, _, algorithm = run_config.build(config)
    # Not prepared: GMPS's PPO experts would cost more than the check itself, and its
    # program is the same with the buffers empty.
    state = algorithm.init(jax.random.PRNGKey(config.run.seed))
    results = {}
    for devices in (1, 2):
        sharding = distributed.task_sharding(devices)
        placed = jax.device_put(state, distributed.replicated(sharding))
        program = programs.IterationPrograms(algorithm, config.run, sharding).program(1, placed)
        metrics = trainer.flatten_metrics(jax.device_get(program(placed)[1]))
        # Split over the devices, the sums over tasks need a reduction across them.
        results[devices] = {"metrics": metrics, "partitioned": "all-reduce" in program.as_text()}
    print(json.dumps(results))
""")

# TRPO's conjugate gradient amplifies the last-bit differences of sums reassociated
# across devices where the Fisher matrix of these tiny batches is singular, and the
# line search's outputs inherit it: they are compared more loosely.
CONJUGATE_GRADIENT_OUTPUTS = {"step_size", "kl", "outer_loss_after", "policy_std"}


# In `make test`, one learner of each kind of outer step (PPO-style, TRPO, Adam on a
# VPG inner loss, the Moreau envelope, imitation); the other MAML compositions reuse
# their parts and run in `make test-slow`.
TWO_DEVICES_FAST = {"promp", "maml-trpo", "dice-vpg", "memrl", "gmps"}


@pytest.mark.parametrize("algo", [a if a in TWO_DEVICES_FAST
                                  else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(ALGORITHMS)])
def test_two_devices_split_the_tasks_and_give_the_numbers_of_one(algo):
    """The task sharding is applied for every algorithm, not by each remembering to: on
    two devices the program is partitioned, and the first iteration's metrics equal one
    device's up to the reassociation of sums over tasks."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
           "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    out = subprocess.run([sys.executable, "-c", TWO_DEVICES, json.dumps(tiny_raw(algo))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    one, two = results["1"], results["2"]
    assert not one["partitioned"] and two["partitioned"], (
        f"{algo}: the two-device program does not split the tasks")
    assert one["metrics"].keys() == two["metrics"].keys()
    for key, value in one["metrics"].items():
        rel = 5e-2 if key in CONJUGATE_GRADIENT_OUTPUTS else 1e-3
        assert two["metrics"][key] == pytest.approx(value, rel=rel, abs=1e-4), (algo, key)
