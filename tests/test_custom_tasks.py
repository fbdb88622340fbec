"""Task distributions of one's own, named by import path: trained through the CLI,
rebuilt from the run's config.yaml, and every broken definition refused in one line
before anything compiles."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from metarl_jax import run_config
from metarl_jax.cli import EXIT_CONFIG_ERROR, main
from metarl_jax.config import ConfigError
from metarl_jax.envs import lookup, make_env
from tests.custom_task_example import LineReach

EXAMPLE = "tests.custom_task_example"
MISTAKES = "tests.custom_task_mistakes"


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_import_path_builds_like_a_registered_task():
    env = make_env(f"{EXAMPLE}:LineReach", backend="spring", horizon=7)
    assert isinstance(env, LineReach)
    assert (env.horizon, env.observation_size, env.action_size) == (7, 1, 1)
    assert env.name == f"{EXAMPLE}:LineReach"  # the class sets none: the path names it
    # A factory that takes no horizon gets it set on the task it returns.
    factory_env = make_env(f"{EXAMPLE}:make_task", horizon=4)
    assert factory_env.horizon == 4 and factory_env.max_step == 0.2
    assert lookup(f"{EXAMPLE}:make_task").horizon == 10
    # One step by hand: x' = clip(0.5, -0.2, 0.2) = 0.2, reward -|0.2 - 0.7|.
    task = {"target": jnp.asarray(0.7)}
    state = env.step(env.reset(jax.random.PRNGKey(0), task), jnp.asarray([0.5]), task)
    np.testing.assert_allclose(state.obs, [0.2])
    np.testing.assert_allclose(state.reward, -0.5, rtol=1e-6)


def test_resolve_config_takes_the_task_horizon_and_the_algorithm_defaults():
    config = run_config.resolve_config({"algo": "promp", "env": {"name": f"{EXAMPLE}:make_task"}})
    assert config.run.env.name == f"{EXAMPLE}:make_task"
    assert config.algorithm.horizon == 10  # the task's own
    assert config.algorithm.meta_batch_size == 40  # no published setting: ProMP's default
    assert config.run.iterations_per_call == 5  # a pure-JAX task: fused calls


def test_a_task_declared_as_physics_runs_one_iteration_per_call():
    config = run_config.resolve_config({"env": {"name": f"{EXAMPLE}:SimulatedLineReach"}})
    assert config.run.iterations_per_call == 1


def test_train_resume_and_eval_through_the_cli(tmp_path):
    out = tmp_path / "run"
    common = ("--quiet", "--set", "meta_batch_size=2", "--set", "episodes_per_task=2",
              "--set", "horizon=5", "--set", "checkpoint_every=1")
    result = run_cli("train", "--env", f"{EXAMPLE}:make_task", "--iterations", "2",
                     "--out", str(out), *common)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["env"]["name"] == f"{EXAMPLE}:make_task" and saved["horizon"] == 5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in records] == [2 * 2 * 5 * 2, 2 * 2 * 5 * 2 * 2]
    for record in records:
        # every reward is -|x' - g| with |x'| <= 1 and |g| <= 1, five steps an episode
        assert -10.0 <= record["pre_return"] <= 0.0 and -10.0 <= record["post_return"] <= 0.0
    # config.yaml names the import path, so the run is rebuilt from it.
    result = run_cli("train", "--resume", str(out), "--iterations", "3", "--quiet")
    assert result.exit_code == 0, result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    result = run_cli("eval", "--run", str(out), "--tasks", "2", "--episodes", "2")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation and "written:" in result.output


@pytest.mark.parametrize("name, message", [
    ("nope", "env.name: unknown environment 'nope'; allowed: ant-dir"),
    (f"{MISTAKES}:", "expected module:attribute"),
    ("tests.no_such_module:Task", "module 'tests.no_such_module' is not importable "
                                  "(ModuleNotFoundError"),
    (f"{MISTAKES}:Nope", f"module '{MISTAKES}' has no attribute 'Nope'; expected a TaskEnv"),
    (f"{MISTAKES}:not_a_task", "is an int; expected a TaskEnv subclass or a function"),
    (f"{MISTAKES}:NotATask", "NotATask is not a TaskEnv; expected a subclass"),
    (f"{MISTAKES}:MissingStep", "MissingStep does not define step; expected a TaskEnv "
                                "defining sample_tasks, reset, step"),
    (f"{MISTAKES}:returns_something_else", "returned an object, not a TaskEnv"),
    (f"{MISTAKES}:raises", "building it raised RuntimeError: no goal file"),
    (f"{MISTAKES}:NoSizes", "observation_size is None; expected an int >= 1"),
    (f"{MISTAKES}:BadEpisodeEnd", "episode_end is 'stop'; allowed: reset, idle"),
    (f"{MISTAKES}:NumpySampler", "sample_tasks(key, 3) cannot be traced by jax.jit "
                                 "(TracerArrayConversionError"),
    (f"{MISTAKES}:StringLeaf", "sample_tasks returns a non-array leaf (['label'] is a str)"),
    (f"{MISTAKES}:IgnoresNumTasks", "returns ['goal'] of shape (2,); expected a leading "
                                    "axis of 3"),
    (f"{MISTAKES}:WrongResetObs", "reset returns obs of shape (3,); expected (2,) = "
                                  "(observation_size,)"),
    (f"{MISTAKES}:WrongStepObs", "step returns obs of shape (4,); expected (2,)"),
    (f"{MISTAKES}:VectorReward", "step returns reward of shape (2,); expected () (a scalar)"),
    (f"{MISTAKES}:BoolDone", "step returns a state whose pytree, shapes or dtypes differ "
                             "from reset's"),
    (f"{MISTAKES}:NotAState", "reset returns an array of shape (2,); expected an EnvState"),
])
def test_a_broken_definition_fails_in_one_line(name, message):
    with pytest.raises(ConfigError) as caught:
        run_config.resolve_config({"algo": "promp", "env": {"name": name}})
    text = str(caught.value)
    assert message in text, text
    assert text.startswith("config: env.name: ") and len(text.splitlines()) == 1


def test_the_cli_reports_a_broken_definition_before_compiling():
    result = CliRunner().invoke(main, ["train", "--env", f"{MISTAKES}:WrongResetObs",
                                       "--iterations", "1", "--print-config"])
    assert result.exit_code == EXIT_CONFIG_ERROR
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: config: env.name: tests.custom_task_mistakes:WrongResetObs:")
