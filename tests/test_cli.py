"""End to end through the `metarl` command line."""

import json
import pathlib
import time

import jax
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from metarl_jax import trainer
from metarl_jax.cli import EXIT_CONFIG_ERROR, main
from metarl_jax.config import load_yaml

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_default_experiment_file_matches_embedded_default():
    with open(REPO / "experiments" / "promp_point_nav.yaml") as f:
        from_file = trainer.resolve_config(yaml.safe_load(f))
    assert from_file == trainer.resolve_config(trainer.DEFAULT_EXPERIMENT)
    assert from_file.algorithm.meta_batch_size == 20
    assert from_file.algorithm.episodes_per_task == 20
    assert from_file.algorithm.horizon == 100


def test_short_point_nav_run_improves_post_return(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--algo", "promp", "--env", "point-nav", "--iterations", "12",
                     "--seed", "0", "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    records = read_metrics(out)
    assert [r["iteration"] for r in records] == list(range(1, 13))
    steps_per_iteration = 20 * 20 * 100 * 2
    assert [r["env_steps"] for r in records] == [steps_per_iteration * i for i in range(1, 13)]
    for key in ("time_s", "pre_return", "post_return", "outer_loss", "kl_0", "kl_coeff_0",
                "clip_fraction"):
        assert key in records[0]
    first = records[0]["post_return"]
    last = sum(r["post_return"] for r in records[-3:]) / 3
    assert last > first + 10.0, (first, last)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["iterations"] == 12 and saved["env"]["name"] == "point-nav"
    assert saved["clip_eps"] == 0.3 and saved["hidden_sizes"] == [64, 64]


@pytest.mark.parametrize("env_name", ["ant-dir"])
def test_one_iteration_of_a_brax_task(tmp_path, env_name):
    # Every other task runs one ProMP iteration in test_task_suite.py, without the CLI.
    out = tmp_path / env_name
    result = run_cli("train", "--env", env_name, "--iterations", "1", "--out", str(out),
                     "--quiet", "--set", "meta_batch_size=2", "--set", "episodes_per_task=2",
                     "--set", "horizon=8", "--set", "promp_steps=2")
    assert result.exit_code == 0, result.output
    (record,) = read_metrics(out)
    assert record["env_steps"] == 2 * 2 * 8 * 2
    assert all(isinstance(v, (int, float)) for v in record.values())
    if env_name == "ant-dir":
        # +1 survive bonus per real step, small control cost, short episodes
        assert -8 < record["pre_return"] < 20


@pytest.mark.parametrize("args, message", [
    (["--algo", "nope"], "algo: unknown algorithm 'nope'; allowed: dice-vpg, emaml-trpo"),
    (["--env", "nope"], "env.name: unknown environment 'nope'; allowed: ant-dir"),
    (["--set", "inner_lr=fast"], "inner_lr: expected float, got 'fast'"),
    (["--set", "meta_batch_size=0"], "meta_batch_size: 0 not allowed; expected >= 1"),
    (["--set", "hidden_sizes=[64, 0]"], "hidden_sizes"),
    (["--set", "env.backend=warp"], "env.backend: 'warp' not allowed; expected one of"),
    (["--set", "learning_rate=0.1"], "unknown key 'learning_rate'"),
    (["--set", "adaptive_kl=maybe"], "adaptive_kl: expected bool"),
    (["--set", "noequals"], "--set expects KEY=VALUE"),
    (["--config", "/nonexistent.yaml"], "cannot read /nonexistent.yaml"),
    (["--set", "checkpoint_every=0"], "checkpoint_every: 0 not allowed; expected >= 1"),
    (["--set", "keep_checkpoints=two"], "keep_checkpoints: expected int, got 'two'"),
    (["--set", "env={name: point-nav, speed: 3}"], "unknown key 'env.speed'"),
    (["--iterations", "0"], "iterations: 0 not allowed; expected >= 1"),
])
def test_configuration_errors_fail_fast_with_one_line(tmp_path, args, message):
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == EXIT_CONFIG_ERROR
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert time.perf_counter() - start < 5.0  # nothing was compiled
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_resume_refuses_other_configuration_flags(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("algo: promp\n")
    for extra in (["--set", "inner_lr=0.2"], ["--seed", "3"], ["--env", "ant-dir"],
                  ["--out", str(tmp_path / "other")], ["--force"]):
        result = CliRunner().invoke(main, ["train", "--resume", str(run), *extra])
        assert result.exit_code == EXIT_CONFIG_ERROR
        assert "not allowed with --resume" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "missing")])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "missing holds no run (no config.yaml)" in result.output


def test_eval_on_a_directory_without_a_run_fails_with_one_line(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--run", str(tmp_path)])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert result.output.strip().splitlines() == [
        f"error: config: --run/--resume: {tmp_path} holds no run (no config.yaml)"]


def test_existing_run_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    result = CliRunner().invoke(main, ["train", "--out", str(out), "--iterations", "1"])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "--force" in result.output
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_envs_lists_every_environment():
    result = run_cli("envs")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "obs", "act", "horizon"]
    assert lines[0].split()[4:] == ["body", "tasks"]
    rows = {line.split()[0]: line.split()[1:5] for line in lines[1:]}
    assert rows == {
        "point-nav": ["2", "2", "100", "pure"],
        "halfcheetah-dir": ["17", "6", "100", "halfcheetah"],
        "halfcheetah-vel": ["17", "6", "100", "halfcheetah"],
        "ant-dir": ["27", "8", "100", "ant"],
        "ant-dir2d": ["27", "8", "100", "ant"],
        "ant-goal": ["29", "8", "200", "ant"],  # x, y observed
        "ant-goal-ring": ["29", "8", "200", "ant"],
        "ant-goal-ring-sparse": ["29", "8", "200", "ant"],
        "walker-dir": ["17", "6", "200", "walker2d"],
        "walker-vel": ["17", "6", "200", "walker2d"],
        "hopper-params": ["11", "3", "200", "hopper"],
        "walker-params": ["17", "6", "200", "walker2d"],
        "humanoid-dir": ["244", "17", "200", "humanoid"],
        "humanoid-dir2d": ["244", "17", "200", "humanoid"],
    }
    assert "quarter circle of radius 2" in result.output
    assert "1.5^U(-3,3)" in result.output


# The ProMP paper's per-setting values (ALGORITHMS.md §1 table) that differ by setting.
PAPER_SETTINGS = {
    "promp_halfcheetah_fwdback.yaml": ("halfcheetah-dir", 100, 1, 0.1, 5, False),
    "promp_ant_fwdback.yaml": ("ant-dir", 100, 1, 0.1, 5, False),
    "promp_ant_rand_dir.yaml": ("ant-dir2d", 100, 1, 0.1, 5, False),
    "promp_ant_rand_goal.yaml": ("ant-goal", 200, 2, 0.1, 5, False),
    "promp_walker_fwdback.yaml": ("walker-dir", 200, 1, 0.1, 5, False),
    "promp_walker_rand_vel.yaml": ("walker-vel", 200, 1, 0.1, 5, False),
    "promp_hopper_rand_params.yaml": ("hopper-params", 200, 1, 0.05, 3, True),
    "promp_walker_rand_params.yaml": ("walker-params", 200, 1, 0.05, 3, True),
    "promp_humanoid_fwdback.yaml": ("humanoid-dir", 200, 1, 0.1, 5, False),
    "promp_humanoid_rand_dir.yaml": ("humanoid-dir2d", 200, 1, 0.1, 5, False),
}


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_experiment_config_resolves_and_builds(path):
    config = trainer.resolve_config(load_yaml(str(path)))
    env, policy, algorithm = trainer.build(config)
    assert env.name == config.run.env.name
    if path.name not in PAPER_SETTINGS:
        return
    name, horizon, inner_steps, inner_lr, promp_steps, adaptive = PAPER_SETTINGS[path.name]
    c = config.algorithm
    assert (config.run.algo, env.name, env.horizon) == ("promp", name, horizon)
    assert (c.meta_batch_size, c.episodes_per_task, config.run.iterations) == (40, 20, 1001)
    assert (c.inner_steps, c.inner_lr, c.promp_steps, c.clip_eps) == (
        inner_steps, inner_lr, promp_steps, 0.3)
    assert c.adaptive_kl is adaptive
    assert c.kl_coeff == (1e-3 if adaptive else 5e-4) and c.kl_target == 0.01
    assert policy.hidden_sizes == ((128, 128) if name.startswith("humanoid") else (64, 64))


def test_gmps_ring_configs_use_the_forty_ring_goals():
    for name in ("gmps_ant_goal_ring.yaml", "gmps_ant_goal_ring_sparse.yaml"):
        config = trainer.resolve_config(load_yaml(str(REPO / "experiments" / name)))
        env, policy, algorithm = trainer.build(config)
        assert (policy.hidden_sizes, policy.activation) == ((100, 100), "relu")
        assert (config.algorithm.episodes_per_task, env.horizon) == (50, 200)
        tasks = env.training_tasks(jax.random.PRNGKey(0), config.algorithm.gmps.num_train_tasks)
        np.testing.assert_array_equal(np.asarray(tasks["goal"]),
                                      np.asarray(env.task_set()["goal"]))
