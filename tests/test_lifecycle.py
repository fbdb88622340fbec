"""Experiment lifecycle: checkpoints, kill-and-resume, determinism, divergence, eval, plots."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from metarl_jax import run_config, run_dir, trainer
from metarl_jax.algorithms.base import AdaptationReturns
from metarl_jax.algorithms.promp import adapt_kl_coeffs
from metarl_jax.checkpoints import Checkpointer
from metarl_jax.cli import EXIT_DIVERGED, main
from metarl_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
# One iteration per call unless a test says otherwise: the tests then share compiled
# programs (and the compilation cache) instead of compiling one per call length.
TINY = ["--set", "meta_batch_size=3", "--set", "episodes_per_task=3", "--set", "horizon=15",
        "--set", "hidden_sizes=[16, 16]", "--set", "iterations_per_call=1"]
TIMING_KEYS = {"time_s", "iteration_s"}


def tiny_config(**overrides):  # one iteration per call, like TINY
    raw = {**run_config.DEFAULT_EXPERIMENT, "meta_batch_size": 3, "episodes_per_task": 3,
           "horizon": 15, "hidden_sizes": [16, 16], "iterations_per_call": 1, **overrides}
    return run_config.resolve_config(raw)


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "metarl_jax.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_same_seed_same_configuration_gives_identical_metrics():
    first = trainer.train(tiny_config(iterations=4), progress=False).history
    second = trainer.train(tiny_config(iterations=4), progress=False).history
    assert without_timing(first) == without_timing(second)
    other_seed = trainer.train(tiny_config(iterations=4, seed=1), progress=False).history
    assert without_timing(first) != without_timing(other_seed)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    iterations = 150
    reference = tmp_path / "reference"
    trainer.train(tiny_config(iterations=iterations, checkpoint_every=7), str(reference),
                  progress=False)

    killed = tmp_path / "killed"
    process = cli("train", "--iterations", str(iterations), "--out", str(killed), "--quiet",
                  "--set", "checkpoint_every=7", *TINY)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 30:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before_kill = len(run_dir.read_metrics(str(killed)))
    assert 30 <= done_before_kill < iterations
    latest = Checkpointer(str(killed / "checkpoints")).latest_iteration()
    assert latest is not None and latest % 7 == 0 and latest <= done_before_kill

    resumed = cli("train", "--resume", str(killed), "--quiet")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    records = run_dir.read_metrics(str(killed))
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    assert without_timing(records) == without_timing(run_dir.read_metrics(str(reference)))

    # A finished run resumes to nothing; a longer total continues it.
    again = CliRunner().invoke(main, ["train", "--resume", str(killed), "--quiet"])
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output


KILL_DURING_SAVE = textwrap.dedent("""
    import pathlib, sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from metarl_jax.checkpoints import Checkpointer

    directory, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    checkpointer = Checkpointer(directory)
    checkpointer.save(1, {"w": jnp.arange(1000.0)}, {"env_steps": 1, "time_s": 0.5})

    async def stall_before_commit(self, *args, **kwargs):
        marker.touch()  # the data of step 2 is written, the rename not yet done
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = stall_before_commit
    checkpointer.save(2, {"w": jnp.arange(1000.0) * 2}, {"env_steps": 2, "time_s": 1.0})
""")


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    directory, marker = tmp_path / "checkpoints", tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(directory),
                                str(marker)])
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert marker.exists(), "the second save never started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    leftovers = [p.name for p in directory.iterdir()]
    assert any(name != "1" for name in leftovers)  # the partial write is on disk...

    checkpointer = Checkpointer(str(directory))
    assert checkpointer.latest_iteration() == 1  # ...but invisible
    state, host = checkpointer.restore({"w": jnp.zeros(1000)})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000.0))
    assert host == {"env_steps": 1, "time_s": 0.5}
    checkpointer.save(2, {"w": jnp.ones(1000)}, {"env_steps": 2, "time_s": 1.0})
    assert checkpointer.all_iterations() == [1, 2]
    checkpointer.close()


def test_planted_nan_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--iterations", "8", "--out", str(out), "--quiet",
        "--set", "checkpoint_every=100", "--set", "debug_nan_at_iteration=4", *TINY])
    assert result.exit_code == EXIT_DIVERGED
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: training diverged at iteration 4: ")
    assert "the last good checkpoint is iteration 3" in line
    assert [r["iteration"] for r in run_dir.read_metrics(str(out))] == [1, 2, 3]
    checkpointer = Checkpointer(str(out / "checkpoints"))
    assert checkpointer.all_iterations() == [3]
    template = run_config.build(tiny_config())[2].init(jax.random.PRNGKey(0))
    state, host = checkpointer.restore(template)
    assert int(state.iteration) == 3 and host["env_steps"] == 3 * 3 * 3 * 15 * 2
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
    checkpointer.close()


def test_checkpoints_keep_the_last_few_and_hold_the_full_state(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(iterations=9, checkpoint_every=2, keep_checkpoints=2, adaptive_kl=True)
    history = trainer.train(config, str(out), progress=False).history
    checkpointer = Checkpointer(str(out / "checkpoints"))
    assert checkpointer.all_iterations() == [8, 9]
    template = run_config.build(config)[2].init(jax.random.PRNGKey(123))
    state, host = checkpointer.restore(template)
    assert int(state.iteration) == 9
    assert host["env_steps"] == history[-1]["env_steps"]
    # The saved KL coefficient is the one the adaptive rule made from the last iteration.
    expected = adapt_kl_coeffs(jnp.array([history[-1]["kl_coeff_0"]]),
                               jnp.array([history[-1]["kl_0"]]), config.algorithm.kl_target)
    assert float(state.kl_coeffs[0]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert len({r["kl_coeff_0"] for r in history}) > 1  # the rule did change it
    assert int(state.opt_state[0].count) == 9 * config.algorithm.promp_steps
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    checkpointer.close()


def test_eval_and_plot_write_their_files(tmp_path):
    run = tmp_path / "run"
    trainer.train(tiny_config(iterations=3, checkpoint_every=1), str(run), progress=False)
    second = tmp_path / "run_seed1"
    trainer.train(tiny_config(iterations=3, seed=1), str(second), progress=False)

    adapt_png = tmp_path / "adapt.png"
    result = CliRunner().invoke(main, ["eval", "--run", str(run), "--tasks", "4",
                                       "--adapt-steps", "2", "--plot", str(adapt_png)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["adapt_steps"] == [0, 1, 2] and report["tasks"] == 4
    assert report["checkpoint_iteration"] == 3
    assert len(report["return_mean"]) == 3 and all(s > 0 for s in report["return_stderr"])
    assert len(report["return_pooled"]) == 3
    assert all(n >= tiny_config().algorithm.episodes_per_task
               for n in report["episodes_per_task_mean"])
    assert "adapt step" in result.output and "episodes pooled" in result.output

    curve_png = tmp_path / "curve.png"
    result = CliRunner().invoke(main, ["plot", str(run), str(second), "--out", str(curve_png)])
    assert result.exit_code == 0, result.output
    import matplotlib.image

    for png in (adapt_png, curve_png):
        pixels = matplotlib.image.imread(str(png))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert float(pixels[..., :3].std()) > 0.05  # not blank


def test_pooled_return_weights_each_task_by_its_episodes():
    """The training metrics pool episodes; `metarl eval`'s mean weighs tasks alike. A task
    whose bodies fall four times as often counts four times in the pooled mean."""
    returns = AdaptationReturns(task_means=jnp.array([[10.0, 20.0], [100.0, 50.0]]),
                                episodes=jnp.array([[4.0, 1.0], [1.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(returns.pooled_mean()),
                               [(4 * 10.0 + 100.0) / 5, 35.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(returns.task_means.mean(axis=0)), [55.0, 35.0])


def test_evaluate_from_python_is_reproducible(tmp_path):
    from metarl_jax.evaluation import evaluate

    run = tmp_path / "run"
    trainer.train(tiny_config(iterations=2), str(run), progress=False)
    first = evaluate(str(run), num_tasks=3, adapt_steps=1, seed=5, write=False)
    second = evaluate(str(run), num_tasks=3, adapt_steps=1, seed=5, write=False)
    assert first == second
    assert not (run / "eval.json").exists()
    other = evaluate(str(run), num_tasks=3, adapt_steps=1, seed=6, write=True)
    assert other["return_mean"] != first["return_mean"]
    assert os.path.exists(run / "eval.json")


def test_fused_calls_give_the_same_run_as_one_iteration_per_call(tmp_path):
    """`iterations_per_call` > 1 scans several meta-iterations in one compiled call; the
    records, checkpoints and final state are those of one iteration per call."""
    single = trainer.train(tiny_config(iterations=7, checkpoint_every=6, iterations_per_call=1),
                           str(tmp_path / "a"), progress=False).history
    fused = trainer.train(tiny_config(iterations=7, checkpoint_every=6, iterations_per_call=3),
                          str(tmp_path / "b"), progress=False).history
    assert [r["iteration"] for r in fused] == list(range(1, 8))
    for a, b in zip(without_timing(single), without_timing(fused)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).all_iterations() == [6, 7]
    assert run_dir.read_metrics(str(tmp_path / "b")) == fused


def test_fused_run_compiles_every_call_length_before_its_first_iteration():
    """Calls of 3, cut at the checkpoint at 6 and at the end (7): the programs for 3 and
    1 iterations are both traced before the loop, none during it."""
    traces = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_, **__: traces.append(name)
        if name == "/jax/core/compile/jaxpr_trace_duration" else None)
    traces_at_each_iteration = []
    trainer.train(tiny_config(iterations=7, checkpoint_every=6, iterations_per_call=3),
                  progress=False, on_iteration=lambda _: traces_at_each_iteration.append(
                      len(traces)))
    assert len(traces_at_each_iteration) == 7
    assert len(set(traces_at_each_iteration)) == 1


def test_divergence_inside_a_fused_call_checkpoints_the_iteration_before_it(tmp_path):
    """Calls of 3 iterations, NaN planted at iteration 5 (the second of the call 4-6): the
    run stops there, records 1-4, and checkpoints iteration 4 (rerun from 3)."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--iterations", "8", "--out", str(out), "--quiet", *TINY,
        "--set", "checkpoint_every=9", "--set", "iterations_per_call=3",
        "--set", "debug_nan_at_iteration=5"])
    assert result.exit_code == EXIT_DIVERGED
    assert "diverged at iteration 5: " in result.output
    assert "the last good checkpoint is iteration 4" in result.output
    assert [r["iteration"] for r in run_dir.read_metrics(str(out))] == [1, 2, 3, 4]
    checkpointer = Checkpointer(str(out / "checkpoints"))
    assert checkpointer.all_iterations() == [4]
    template = run_config.build(tiny_config())[2].init(jax.random.PRNGKey(0))
    state, host = checkpointer.restore(template)
    checkpointer.close()
    assert int(state.iteration) == 4 and host["env_steps"] == 4 * 3 * 3 * 15 * 2
    plain = trainer.train(tiny_config(iterations=4, iterations_per_call=1), progress=False).state
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_fused_calls_are_the_default_on_tasks_without_physics():
    """Unless the configuration names it, `iterations_per_call` is the largest divisor of
    `checkpoint_every` up to 5 on a pure-JAX task and 1 on a physics task; the resolved
    number is what the run directory records, so a resumed run keeps it."""
    def resolved(**overrides):  # tiny_config, but with the key left to its default
        return tiny_config(iterations_per_call=None, **overrides)

    assert resolved().run.iterations_per_call == 5
    assert resolved(checkpoint_every=6).run.iterations_per_call == 3
    assert resolved(checkpoint_every=7).run.iterations_per_call == 1
    assert tiny_config(iterations_per_call=2).run.iterations_per_call == 2
    assert resolved().to_dict()["iterations_per_call"] == 5
    for name in ("halfcheetah-dir", "ant-dir", "hopper-params"):
        config = run_config.resolve_config({"env": {"name": name}})
        assert config.run.iterations_per_call == 1, name


def test_iterations_per_call_must_divide_checkpoint_every():
    with pytest.raises(ConfigError, match="iterations_per_call: 7 does not divide "
                                          "checkpoint_every \\(50\\)"):
        tiny_config(iterations_per_call=7)


def test_a_parked_checkpoint_continues_the_run_elsewhere(tmp_path):
    """experiments/reproduce_summary.py keeps a run's newest checkpoint beside its
    committed summary: of a finished run, the final meta-policy; of an unfinished one, a
    copy that, resumed, gives the run's own numbers."""
    sys.path.insert(0, str(REPO / "experiments"))
    import reproduce_summary  # noqa: E402  (a script, not a package)

    original = tmp_path / "runs" / "promp_seed0"
    trainer.train(tiny_config(iterations=4, checkpoint_every=2), str(original), progress=False)
    parked = tmp_path / "summary" / "promp_seed0"
    parked.mkdir(parents=True)
    reproduce_summary.park_checkpoint(original, parked)
    assert [p.name for p in (parked / "checkpoints").iterdir()] == ["4"]  # the final one
    template = run_config.build(tiny_config())[2].init(jax.random.PRNGKey(0))
    restored = []
    for directory in (parked, original):
        checkpointer = Checkpointer(str(directory / "checkpoints"))
        restored.append(checkpointer.restore(template, 4)[0].params)
        checkpointer.close()
    for a, b in zip(*map(jax.tree.leaves, restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shutil.rmtree(parked / "checkpoints")

    config = (original / "config.yaml").read_text()
    (original / "config.yaml").write_text(config.replace("iterations: 4", "iterations: 6"))
    (original / "checkpoints" / "4" / "_CHECKPOINT_METADATA").unlink()  # 4 incomplete
    reproduce_summary.park_checkpoint(original, parked)
    assert [p.name for p in (parked / "checkpoints").iterdir()] == ["2"]  # newest complete

    # What the reproduction script does on a fresh clone: the summary and the parked
    # checkpoint as the run directory, then --resume.
    moved = tmp_path / "fresh" / "promp_seed0"
    moved.mkdir(parents=True)
    (moved / "config.yaml").write_text(config)
    # The summary's metrics may run past the checkpoint: resuming drops those records.
    shutil.copy2(original / "metrics.jsonl", moved / "metrics.jsonl")
    shutil.copytree(original / "checkpoints" / "2", moved / "checkpoints" / "2")
    result = CliRunner().invoke(main, ["train", "--resume", str(moved), "--quiet"])
    assert result.exit_code == 0, result.output
    assert without_timing(run_dir.read_metrics(str(moved))) == \
        without_timing(run_dir.read_metrics(str(original)))


def test_the_reproduction_report_takes_each_task_table_once():
    """The summary script replaces a task's table in docs/reproduction.md between its
    markers, and gives a task new to the report its own section before "What differs"."""
    sys.path.insert(0, str(REPO / "experiments"))
    import reproduce_summary  # noqa: E402

    report = ("# Report\n\n## cheetah (long name)\n\n<!-- summary:cheetah -->\nold rows\n"
              "<!-- /summary:cheetah -->\n\nprose\n\n## What differs\n\ntext\n")
    updated = reproduce_summary.put_in_report(report, "cheetah", "## cheetah\n\nnew rows\n")
    assert "old rows" not in updated and updated.count("new rows") == 1
    assert "## cheetah (long name)" in updated and "prose" in updated
    assert reproduce_summary.put_in_report(updated, "cheetah", "## cheetah\n\nnew rows\n") \
        == updated
    added = reproduce_summary.put_in_report(updated, "ant", "## ant\n\nant rows\n")
    assert added.index("## ant\n") < added.index("ant rows") < added.index("## What differs")
    assert added.index("prose") < added.index("## ant\n")


def test_the_reproduction_blocks_average_whole_blocks_only(tmp_path):
    """`reproduce_summary.py --blocks N`: each run's mean post-update return (or, with
    `--metric gain`, post − pre) over iterations 1..N, N+1..2N, …, with σ at the block's
    end; a run that has not finished a block shows a dash there."""
    sys.path.insert(0, str(REPO / "experiments"))
    import reproduce_summary  # noqa: E402

    def write_run(name, posts):
        run = tmp_path / name
        run.mkdir()
        run.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"iteration": i + 1, "post_return": post, "pre_return": post - i,
                        "policy_std": 1.0 - i / 10})
            + "\n" for i, post in enumerate(posts)))
        return run

    table = reproduce_summary.blocks_table([write_run("promp_seed0", [1.0, 3.0, 5.0, 7.0, 9.0]),
                                            write_run("promp_seed1", [2.0, 4.0, 6.0])], 2)
    assert table.splitlines() == [
        "| iterations | promp_seed0 | promp_seed1 |", "|---|---|---|",
        "| 1–2 | 2.0 (σ 0.90) | 3.0 (σ 0.90) |", "| 3–4 | 6.0 (σ 0.70) | – |"]
    gains = reproduce_summary.blocks_table([tmp_path / "promp_seed0"], 2, metric="gain")
    assert gains.splitlines()[2:] == ["| 1–2 | 0.5 (σ 0.90) |", "| 3–4 | 2.5 (σ 0.70) |"]


def test_the_reproduction_means_count_finished_runs_only():
    """A seed still under way has no eval.json; its last 10 iterations are from earlier
    in training, so the per-algorithm mean leaves it out until it finishes."""
    sys.path.insert(0, str(REPO / "experiments"))
    import reproduce_summary  # noqa: E402

    def row(run, post, finished):
        return {"run": run, "algo": run.split("_")[0], "iterations": 160 if finished else 79,
                "env_steps": 1, "hours": 1.0, "at_marks": {}, "post_last": post,
                "pre_last": 0.0,
                "eval": {"return_mean": [0.0, 1.0, 2.0, 3.0]} if finished else None}

    two_finished = reproduce_summary.task_table(
        "cheetah", [row("promp_seed0", 170.0, True), row("promp_seed1", 150.0, True)], [])
    assert "- promp, mean of 2 seeds: post 160.0" in two_finished
    one_under_way = reproduce_summary.task_table(
        "cheetah", [row("maml-trpo_seed0", 90.0, True), row("maml-trpo_seed1", 30.0, False)],
        [])
    assert "maml-trpo_seed1 | 79 |" in one_under_way  # the row is shown
    assert "maml-trpo, mean of" not in one_under_way  # but not averaged
    assert "episodes pooled" not in two_finished

    # Evaluations that report the pooled mean get a column of it; older ones a dash.
    pooled = dict(row("promp_seed0", 1.0, True),
                  eval={"return_mean": [5.0, 6.0], "return_pooled": [3.0, 4.5]})
    with_pooled = reproduce_summary.task_table(
        "hopper", [pooled, row("promp_seed1", 1.0, True)], [])
    assert "| held-out, episodes pooled |" in with_pooled
    assert "| 5.0 / 6.0 | 3.0 / 4.5 |" in with_pooled
    assert "| 0.0 / 1.0 / 2.0 / 3.0 | – |" in with_pooled
