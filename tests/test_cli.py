"""End to end through the `metarl` command line."""

import json
import pathlib
import re
import time

import jax
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from metarl_jax import run_config
from metarl_jax.algorithms import ALGORITHMS
from metarl_jax.cli import EXIT_CONFIG_ERROR, main
from metarl_jax.config import load_yaml
from metarl_jax.envs import ENVIRONMENTS

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_default_experiment_file_matches_embedded_default():
    with open(REPO / "experiments" / "promp_point_nav.yaml") as f:
        from_file = run_config.resolve_config(yaml.safe_load(f))
    assert from_file == run_config.resolve_config(run_config.DEFAULT_EXPERIMENT)
    assert from_file == run_config.resolve_config({})  # what `metarl train` alone runs
    assert (from_file.run.algo, from_file.run.env.name, from_file.run.iterations) == (
        "promp", "point-nav", 100)
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
    from metarl_jax.envs import ENVIRONMENTS, describe, make_env

    declared = ENVIRONMENTS[env_name]  # its `metarl envs` row is the built env's
    assert describe(declared) == {**make_env(env_name).describe(), "horizon": declared.horizon}
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
    (["--set", "logger=mlflow"],
     "logger: 'mlflow' not allowed; expected one of tensorboard, wandb, none"),
    (["--set", "env={name: point-nav, speed: 3}"], "unknown key 'env.speed'"),
    (["--iterations", "0"], "iterations: 0 not allowed; expected >= 1"),
    (["--set", "env=point-nav"], "env: expected a mapping, got 'point-nav'"),
    (["--algo", "maml-trpo", "--set", "averaging=mean"],
     "averaging: 'mean' not allowed; expected one of steps, episodes"),
    (["--algo", "lvc-trpo", "--set", "kl_direction=both"],
     "kl_direction: 'both' not allowed; expected one of old_new, new_old"),
    (["--set", "kl_direction=new_old"], "kl_direction: an option of emaml-trpo, lvc-trpo, "
                                        "maml-trpo, not of algo promp"),
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
    table, footer = result.output.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["name", "obs", "act", "horizon"]
    assert lines[0].split()[4:] == ["body", "backend", "tasks"]
    rows = {line.split()[0]: line.split()[1:5] for line in lines[1:]}
    # The default physics: MuJoCo's solver where it is also the fastest on a CPU (the
    # ant, the humanoid), Brax's generalized pipeline on the planar bodies and on GMPS's
    # ant ring (where its experiments were made).
    backends = {line.split()[0]: line.split()[5] for line in lines[1:]
                if "pure JAX" not in line}
    assert backends == {
        name: "mjx" if name.startswith(("ant", "humanoid")) and "ring" not in name
        else "generalized" for name in ENVIRONMENTS if name != "point-nav"}
    assert list(rows) == sorted(ENVIRONMENTS)
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
    assert "generalized, positional, spring, mjx" in footer and "module:attribute" in footer


# The published settings, written out from the papers' tables: per task (H, M, N, K, α,
# policy) for ProMP and its MAML-family baselines, and ProMP's own (P, adaptive KL, c₀).
SETTING_OF = {
    "point-nav": (100, 20, 20, 1, 0.1, (64, 64)),
    "halfcheetah-dir": (100, 40, 20, 1, 0.1, (64, 64)),
    "halfcheetah-vel": (100, 40, 20, 1, 0.1, (64, 64)),
    "ant-dir": (100, 40, 20, 1, 0.1, (64, 64)),
    "ant-dir2d": (100, 40, 20, 1, 0.1, (64, 64)),
    "ant-goal": (200, 40, 20, 2, 0.1, (64, 64)),
    "ant-goal-ring": (200, 40, 20, 1, 0.1, (64, 64)),
    "ant-goal-ring-sparse": (200, 40, 20, 1, 0.1, (64, 64)),
    "walker-dir": (200, 40, 20, 1, 0.1, (64, 64)),
    "walker-vel": (200, 40, 20, 1, 0.1, (64, 64)),
    "hopper-params": (200, 40, 20, 1, 0.05, (64, 64)),
    "walker-params": (200, 40, 20, 1, 0.05, (64, 64)),
    "humanoid-dir": (200, 40, 20, 1, 0.1, (128, 128)),
    "humanoid-dir2d": (200, 40, 20, 1, 0.1, (128, 128)),
}
PARAMS_TASKS = ("hopper-params", "walker-params")
# GMPS's reference setting on the ant ring (40 tasks, 50 episodes, H = 200, 2 × 100
# ReLU), and on point-nav the task's (M = 20).
GMPS_SETTING_OF = {
    "ant-goal-ring": (200, 40, 50, 1, 0.1, (100, 100), "relu"),
    "ant-goal-ring-sparse": (200, 40, 50, 1, 0.1, (100, 100), "relu"),
    "point-nav": (100, 20, 20, 1, 0.1, (64, 64), "tanh"),
}


def sampling_setting(config):
    c = config.algorithm
    return (c.horizon, c.meta_batch_size, c.episodes_per_task, c.inner_steps, c.inner_lr,
            tuple(c.hidden_sizes))


@pytest.mark.parametrize("env_name", sorted(SETTING_OF))
@pytest.mark.parametrize("algo", ["promp", "maml-trpo", "maml-vpg", "dice-vpg"])
def test_published_setting_of_every_task(algo, env_name):
    config = run_config.resolve_config({"algo": algo, "env": {"name": env_name}})
    assert sampling_setting(config) == SETTING_OF[env_name]
    assert (config.run.iterations, config.algorithm.activation) == (1001, "tanh")
    assert config.algorithm.discount == 0.99 and config.algorithm.gae_lambda == 1.0
    c = config.algorithm
    if algo == "promp":
        adaptive = env_name in PARAMS_TASKS
        assert (c.promp_steps, c.clip_eps, c.outer_lr) == (3 if adaptive else 5, 0.3, 1e-3)
        assert (c.adaptive_kl, c.kl_coeff, c.kl_target) == (
            adaptive, 1e-3 if adaptive else 5e-4, 0.01)
    elif algo == "maml-trpo":
        assert (c.max_kl, c.cg_iterations, c.cg_damping, c.backtrack_ratio,
                c.max_backtracks, c.first_order) == (0.01, 10, 1e-5, 0.8, 15, False)
        assert (c.averaging, c.kl_direction) == ("steps", "old_new")
    else:
        assert (c.outer_lr, c.first_order) == (1e-3, False)


def test_the_backend_is_the_tasks_default_unless_one_is_named():
    resolve = run_config.resolve_config
    assert resolve({"env": {"name": "ant-dir"}}).run.env.backend == "mjx"
    assert resolve({"env": {"name": "humanoid-dir"}}).run.env.backend == "mjx"
    assert resolve({"env": {"name": "halfcheetah-dir"}}).run.env.backend == "generalized"
    assert resolve({"env": {"name": "point-nav"}}).run.env.backend == "generalized"
    assert resolve({"algo": "gmps", "env": {"name": "ant-goal-ring"}}).run.env.backend \
        == "generalized"
    assert resolve({"env": {"name": "ant-dir", "backend": "generalized"}}).run.env.backend \
        == "generalized"
    # Written out resolved, so a resumed run keeps its physics if a default changes.
    result = run_cli("train", "--env", "ant-dir", "--print-config")
    assert result.exit_code == 0 and yaml.safe_load(result.output)["env"] == {
        "name": "ant-dir", "backend": "mjx"}


@pytest.mark.parametrize("env_name", sorted(GMPS_SETTING_OF))
def test_published_setting_of_gmps(env_name):
    config = run_config.resolve_config({"algo": "gmps", "env": {"name": env_name}})
    assert (*sampling_setting(config), config.algorithm.activation) == GMPS_SETTING_OF[env_name]
    assert (config.algorithm.gmps.num_train_tasks, config.algorithm.gmps.imitation_steps) == (
        40, 500)


@pytest.mark.parametrize("env_name, horizon, meta_batch_size", [
    ("point-nav", 100, 20), ("halfcheetah-vel", 100, 40), ("humanoid-dir", 200, 40)])
def test_memrl_takes_the_task_setting_and_keeps_its_own_inner_steps(env_name, horizon,
                                                                      meta_batch_size):
    c = run_config.resolve_config({"algo": "memrl", "env": {"name": env_name}}).algorithm
    assert (c.horizon, c.meta_batch_size, c.inner_steps, c.proximal_lambda) == (
        horizon, meta_batch_size, 5, 2.0)
    assert tuple(c.hidden_sizes) == ((128, 128) if env_name == "humanoid-dir" else (64, 64))


def test_every_task_has_a_published_setting_that_every_algorithm_accepts():
    assert set(run_config.PUBLISHED_SETTINGS) == set(ENVIRONMENTS)
    for env_name in ENVIRONMENTS:
        for algo in ALGORITHMS:
            run_config.resolve_config({"algo": algo, "env": {"name": env_name}})


def print_config(*args):
    result = CliRunner().invoke(main, ["train", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


@pytest.mark.parametrize("env_name", sorted(SETTING_OF))
def test_algo_and_env_flags_alone_get_the_published_setting(env_name):
    printed = print_config("--algo", "promp", "--env", env_name)
    assert (printed["algo"], printed["env"]["name"], printed["iterations"]) == (
        "promp", env_name, 1001)
    assert (printed["horizon"], printed["meta_batch_size"], printed["episodes_per_task"],
            printed["inner_steps"], printed["inner_lr"], tuple(printed["hidden_sizes"])
            ) == SETTING_OF[env_name]
    assert printed["promp_steps"] == (3 if env_name in PARAMS_TASKS else 5)
    assert printed["adaptive_kl"] is (env_name in PARAMS_TASKS)
    trpo = print_config("--algo", "maml-trpo", "--env", env_name)
    assert (trpo["horizon"], trpo["meta_batch_size"], trpo["inner_steps"],
            trpo["inner_lr"]) == tuple(SETTING_OF[env_name][i] for i in (0, 1, 3, 4))


def test_with_neither_algo_nor_env_the_built_in_experiment_runs():
    built_in = print_config()
    assert (built_in["algo"], built_in["env"]["name"], built_in["iterations"]) == (
        "promp", "point-nav", 100)
    assert (built_in["meta_batch_size"], built_in["episodes_per_task"],
            built_in["horizon"]) == (20, 20, 100)
    assert print_config("--seed", "3", "--set", "inner_lr=0.05")["iterations"] == 100
    # Naming either one asks for that task's published setting, 1001 iterations.
    for args in (["--env", "point-nav"], ["--algo", "promp"], ["--algo", "maml-trpo"]):
        named = print_config(*args)
        assert (named["env"]["name"], named["iterations"], named["meta_batch_size"],
                named["horizon"]) == ("point-nav", 1001, 20, 100)


def test_config_file_below_flags_below_set_above_the_task_setting(tmp_path):
    path = tmp_path / "ant_goal.yaml"
    path.write_text("algo: promp\nenv:\n  name: ant-goal\nmeta_batch_size: 10\n")
    from_file = print_config("--config", str(path))
    # The file names the task but not its horizon or K: the task's setting fills them.
    assert (from_file["horizon"], from_file["inner_steps"], from_file["meta_batch_size"],
            from_file["iterations"]) == (200, 2, 10, 1001)
    flagged = print_config("--config", str(path), "--iterations", "7", "--set", "inner_steps=3",
                           "--set", "meta_batch_size=8", "--env", "hopper-params")
    assert (flagged["env"]["name"], flagged["iterations"], flagged["inner_steps"],
            flagged["meta_batch_size"], flagged["inner_lr"], flagged["adaptive_kl"]) == (
        "hopper-params", 7, 3, 8, 0.05, True)
    # A config file without algo or env is the built-in experiment's point-nav run.
    path.write_text("inner_lr: 0.05\n")
    assert (print_config("--config", str(path))["iterations"],
            print_config("--config", str(path))["inner_lr"]) == (100, 0.05)


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_experiment_config_resolves_and_builds(path):
    config = run_config.resolve_config(load_yaml(str(path)))
    env, policy, algorithm = run_config.build(config)
    assert env.name == config.run.env.name


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "experiments").glob("*.yaml")
                                        if not p.name.startswith("gmps_")),
                         ids=lambda p: p.name)
def test_experiment_files_set_only_what_differs_from_the_defaults(path):
    raw = load_yaml(str(path))
    named = {"algo": raw["algo"], "env": {"name": raw["env"]["name"]}}
    defaults = run_config.resolve_config(named).to_dict()
    restated = [key for key, value in raw.items()
                if key not in ("algo", "env") and defaults[key] == value]
    restated += [f"env.{key}" for key, value in raw["env"].items()
                 if key != "name" and defaults["env"][key] == value]
    assert not restated, f"{path.name} restates defaults: {restated}"
    if path.name.startswith("promp_") and path.name != "promp_point_nav.yaml":
        assert raw == named  # a published setting: the task's defaults, nothing else


def test_gmps_ring_configs_use_the_forty_ring_goals():
    for name in ("gmps_ant_goal_ring.yaml", "gmps_ant_goal_ring_sparse.yaml"):
        config = run_config.resolve_config(load_yaml(str(REPO / "experiments" / name)))
        env, policy, algorithm = run_config.build(config)
        assert (policy.hidden_sizes, policy.activation) == ((100, 100), "relu")
        assert (config.algorithm.episodes_per_task, env.horizon) == (50, 200)
        tasks = env.training_tasks(jax.random.PRNGKey(0), config.algorithm.gmps.num_train_tasks)
        np.testing.assert_array_equal(np.asarray(tasks["goal"]),
                                      np.asarray(env.task_set()["goal"]))


def test_info_reports_versions_backend_and_devices():
    import platform

    result = run_cli("info")
    assert result.exit_code == 0, result.output
    # label, two or more spaces, value
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1)
                for line in result.output.strip().splitlines())
    assert rows["jax"] == jax.__version__ and rows["jaxlib"] == jax.lib.__version__
    for name in ("flax", "optax", "brax", "orbax-checkpoint", "mujoco"):
        assert rows[name][0].isdigit(), (name, rows[name])
    assert rows["backend"] == jax.default_backend()
    assert rows["python"].startswith(platform.python_version())
    devices = [label for label in rows if label.startswith("device ")]
    assert len(devices) == len(jax.devices())
    if jax.default_backend() == "cpu":
        assert rows["device 0"] == "cpu cpu, memory n/a"
    assert f"{len(jax.devices('cpu'))} CPU device" in rows["CPU split"]
    assert "XLA_FLAGS" in rows
    # JAX has started in this process: the CPU can no longer be split.
    result = CliRunner().invoke(main, ["info", "--cpu-devices", "2"])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "cpu_devices: JAX has already started its CPU backend" in result.output
