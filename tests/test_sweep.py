"""Seeds and sweeps as one compiled program: each member equals its separate run, keys
that change the program are refused before compiling, a diverging member stops alone,
and a resumed sweep equals an uninterrupted one."""

import json

import pytest
from click.testing import CliRunner

from metarl_jax import plotting, run_config, run_dir, sweep, trainer
from metarl_jax.checkpoints import Checkpointer
from metarl_jax.cli import EXIT_CONFIG_ERROR, main
from metarl_jax.config import ConfigError

TINY = {"meta_batch_size": 2, "episodes_per_task": 2, "horizon": 8, "hidden_sizes": [8, 8],
        "iterations_per_call": 1}
TIMING_KEYS = {"time_s", "iteration_s"}


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def close(got: list[dict], want: list[dict]):
    """Same records; numbers equal up to the reassociation vmap may bring."""
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for a, b in zip(without_timing(got), without_timing(want)):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_parse_seeds_and_sweeps():
    assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
    assert sweep.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert sweep.parse_seeds("0-1,7") == [0, 1, 7]
    with pytest.raises(ConfigError, match="--seeds: 'a'; expected integers and ranges"):
        sweep.parse_seeds("a")
    assert sweep.parse_sweep(["inner_lr=0.05,0.1", "kl_coeff=1e-4"]) == {
        "inner_lr": [0.05, 0.1], "kl_coeff": ["1e-4"]}  # YAML's; resolved to a float
    (member,) = sweep.expand({**TINY}, None, {"kl_coeff": ["1e-4"]})
    assert member.config.algorithm.kl_coeff == 1e-4
    members = sweep.expand({**TINY, "iterations": 2}, [0, 1],
                           {"inner_lr": [0.05, 0.1]})
    assert [m.name for m in members] == ["inner_lr=0.05_seed0", "inner_lr=0.05_seed1",
                                         "inner_lr=0.1_seed0", "inner_lr=0.1_seed1"]
    assert [(m.config.algorithm.inner_lr, m.config.run.seed) for m in members] == [
        (0.05, 0), (0.05, 1), (0.1, 0), (0.1, 1)]


def test_a_key_that_changes_the_program_is_refused_with_the_sweepable_keys():
    with pytest.raises(ConfigError) as error:
        sweep.expand({**TINY}, [0], {"meta_batch_size": [2, 4]})
    message = str(error.value)
    assert message.startswith("config: --sweep: meta_batch_size changes the program's "
                              "shapes or structure and cannot be swept; sweepable for promp: ")
    for key in ("seed", "inner_lr", "discount", "gae_lambda", "outer_lr", "clip_eps",
                "kl_coeff", "kl_target"):
        assert key in message.split("sweepable for promp: ")[1].split(", ")
    result = CliRunner().invoke(main, ["train", "--seeds", "0,1", "--sweep", "horizon=5,10",
                                       "--out", "unused"])
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert "config: --sweep: horizon changes the program's shapes" in result.output


def test_a_number_the_algorithm_branches_on_is_refused_before_compiling(tmp_path):
    """GMPS picks its inner loss on `gmps.importance_clip` in Python: a float, but not
    a number inside the program."""
    members = sweep.expand({**TINY, "algo": "gmps", "iterations": 1,
                            "gmps": {"num_train_tasks": 2}}, [0],
                           {"gmps.importance_clip": [0.0, 2.0]})
    with pytest.raises(ConfigError, match="gmps.importance_clip: gmps decides its program "
                                          "on one of these values"):
        sweep.train_sweep(members, str(tmp_path / "sweep"), progress=False)


def test_each_member_equals_its_separate_run_and_resume_equals_uninterrupted(tmp_path):
    raw = {**TINY, "iterations": 4, "checkpoint_every": 2, "iterations_per_call": 2}
    members = sweep.expand(raw, [1], {"inner_lr": [0.05, 0.2]})
    out = tmp_path / "sweep"
    results = sweep.train_sweep(members, str(out), progress=False)
    for member, result in zip(members, results):
        separate = trainer.train(member.config, progress=False).history
        close(result.history, separate)
        assert run_dir.read_metrics(str(out / member.name)) == result.history
        assert run_dir.load_run_config(str(out / member.name)) == member.config
    index = json.loads((out / sweep.SWEEP_INDEX).read_text())
    assert index["swept"] == ["inner_lr"]
    assert [m["name"] for m in index["members"]] == [m.name for m in members]

    # Interrupted after iteration 2 (its checkpoint), then resumed from the index.
    short = tmp_path / "short"
    sweep.train_sweep(sweep.expand({**raw, "iterations": 2}, [1],
                                   {"inner_lr": [0.05, 0.2]}), str(short), progress=False)
    resumed = sweep.train_sweep(sweep.load_members(str(short), iterations=4), str(short),
                                resume=True, progress=False)
    assert [[r["iteration"] for r in r_.history] for r_ in resumed] == [[3, 4]] * 2
    for member in members:
        assert without_timing(run_dir.read_metrics(str(short / member.name))) == \
            without_timing(run_dir.read_metrics(str(out / member.name)))

    figure = plotting.plot_runs([str(out)], str(tmp_path / "sweep.png"),
                                references=[(400, -20.0, "a paper's value")], title="t")
    assert (tmp_path / "sweep.png").stat().st_size > 0 and figure.endswith("sweep.png")
    with_std = plotting.plot_runs([str(out)], str(tmp_path / "sigma.png"), show_std=True)
    import matplotlib.image

    # The σ panel makes the figure taller: 6 inches against 4.5 at the same dpi.
    assert matplotlib.image.imread(with_std).shape[0] == \
        matplotlib.image.imread(figure).shape[0] * 6 // 4.5


def test_a_diverging_member_stops_alone(tmp_path, capsys):
    """Both members in one vmapped batch (`sweep_batch: 2`; on a CPU the default runs
    them one after another), so the frozen member's mask is what keeps it still."""
    raw = {**TINY, "iterations": 3, "checkpoint_every": 1, "sweep_batch": 2}
    members = sweep.expand(raw, [0], {"debug_nan_at_iteration": [None, 2]})
    out = tmp_path / "sweep"
    lines = []
    results = sweep.train_sweep(members, str(out), progress=False, log=lines.append)
    healthy, diverged = members
    assert [r["iteration"] for r in results[0].history] == [1, 2, 3]
    assert [r["iteration"] for r in results[1].history] == [1]
    assert lines == [f"warning: member {diverged.name} diverged at iteration 2: outer_loss "
                     "non-finite (nan); its last good checkpoint is iteration 1; the others "
                     "go on"]
    assert Checkpointer(str(out / diverged.name / "checkpoints")).all_iterations() == [1]
    assert Checkpointer(str(out / healthy.name / "checkpoints")).all_iterations() == [1, 2, 3]
    alone = trainer.train(run_config.resolve_config({**raw, "seed": 0, "sweep_batch": None}),
                          progress=False).history
    close(results[0].history, alone)


@pytest.mark.slow
def test_sigterm_checkpoints_every_member_and_resume_continues_them(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from metarl_jax.cli import EXIT_PREEMPTED

    def cli(*args):
        return subprocess.Popen([sys.executable, "-m", "metarl_jax.cli", "train", "--quiet",
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    out = tmp_path / "sweep"
    tiny = [arg for key, value in TINY.items()
            for arg in ("--set", f"{key}={json.dumps(value)}")]
    process = cli("--seeds", "0,1", "--iterations", "100000", "--out", str(out),
                  "--set", "checkpoint_every=100000", *tiny)
    deadline = time.monotonic() + 300
    while len(run_dir.read_metrics(str(out / "seed1"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr
    last = run_dir.read_metrics(str(out / "seed0"))[-1]["iteration"]
    for member in ("seed0", "seed1"):
        assert [r["iteration"] for r in run_dir.read_metrics(str(out / member))] == list(
            range(1, last + 1))
        assert Checkpointer(str(out / member / "checkpoints")).all_iterations() == [last]
    resumed = cli("--resume", str(out), "--iterations", str(last + 1))
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    for member in ("seed0", "seed1"):
        assert [r["iteration"] for r in run_dir.read_metrics(str(out / member))] == list(
            range(1, last + 2))


def test_members_are_computed_one_at_a_time_on_a_cpu_and_together_on_accelerators():
    class Device:
        def __init__(self, platform):
            self.platform = platform

    class Mesh:
        def __init__(self, platform):
            self.devices = [Device(platform)]

    class Sharding:
        def __init__(self, platform):
            self.mesh = Mesh(platform)

    assert sweep.members_per_batch(None, 6, Sharding("cpu")) == 1
    assert sweep.members_per_batch(None, 6, Sharding("gpu")) == 6
    assert sweep.members_per_batch(4, 6, Sharding("cpu")) == 4
    assert sweep.members_per_batch(8, 6, Sharding("tpu")) == 6
