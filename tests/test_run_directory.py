"""Faults a run directory must survive: pre-emption by SIGTERM, a second writer, a
corrupt checkpoint, and a batch too large for the machine. Each test injects the fault
and checks what the user is told and that nothing already written is lost."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from metarl_jax import run_config, run_dir, trainer
from metarl_jax.checkpoints import Checkpointer
from metarl_jax.cli import EXIT_CONFIG_ERROR, EXIT_PREEMPTED, EXIT_RUN_DIRECTORY

TINY = ["--set", "meta_batch_size=2", "--set", "episodes_per_task=2", "--set", "horizon=8",
        "--set", "hidden_sizes=[8, 8]", "--set", "iterations_per_call=1"]
TIMING_KEYS = {"time_s", "iteration_s"}


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "metarl_jax.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def wait_for_records(out: pathlib.Path, count: int, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(run_dir.read_metrics(str(out))) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError(f"no {count} records in {out} after {timeout} s")


def tiny_config(**overrides):
    return run_config.resolve_config({
        **run_config.DEFAULT_EXPERIMENT, "meta_batch_size": 2, "episodes_per_task": 2,
        "horizon": 8, "hidden_sizes": [8, 8], "iterations_per_call": 1, **overrides})


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_sigterm_checkpoints_the_last_completed_iteration_and_exits_75(tmp_path):
    out = tmp_path / "run"
    process = cli("train", "--iterations", "100000", "--out", str(out), "--quiet",
                  "--set", "checkpoint_every=1000", *TINY)
    wait_for_records(out, 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr
    records = run_dir.read_metrics(str(out))
    last = records[-1]["iteration"]
    assert f"stopped by SIGTERM after iteration {last}; iteration {last} is checkpointed" \
        in stderr
    assert f"metarl train --resume {out}" in stderr
    assert Checkpointer(str(out / "checkpoints")).all_iterations() == [last]
    assert [r["iteration"] for r in records] == list(range(1, last + 1))

    resumed = cli("train", "--resume", str(out), "--iterations", str(last + 2), "--quiet")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert [r["iteration"] for r in run_dir.read_metrics(str(out))] == list(
        range(1, last + 3))


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = cli("train", "--iterations", "100000", "--out", str(out), "--quiet",
                "--set", "checkpoint_every=2", *TINY)
    try:
        wait_for_records(out, 3, first)
        for args in (["--resume", str(out)], ["--out", str(out), "--force", *TINY]):
            second = cli("train", "--quiet", *args)
            _, stderr = second.communicate(timeout=300)
            assert second.returncode == EXIT_RUN_DIRECTORY, stderr
            assert f"is in use by pid {first.pid} on host " in stderr, stderr
            assert len(stderr.strip().splitlines()) == 1, stderr
        assert (out / "config.yaml").exists()  # --force removed nothing
        assert len(run_dir.read_metrics(str(out))) >= 3
    finally:
        first.kill()
        first.communicate()
    kept = Checkpointer(str(out / "checkpoints")).latest_iteration()
    resumed = cli("train", "--resume", str(out), "--iterations", str(kept + 1), "--quiet")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"taking over the lock of pid {first.pid}" in stderr
    assert [r["iteration"] for r in run_dir.read_metrics(str(out))] == list(
        range(1, kept + 2))
    assert (out / run_dir.LOCK_FILE).read_text() == ""  # released on a clean exit


def flip_middle_bits(checkpoint: pathlib.Path, largest_only: bool = False) -> None:
    """Flips one bit in the middle of the checkpoint's array-data files (or only of the
    largest one)."""
    files = sorted((p for p in (checkpoint / "state").rglob("*")
                    if p.is_file() and p.parent.name == "d"), key=lambda p: -p.stat().st_size)
    for path in files[:1] if largest_only else files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def test_a_flipped_bit_orbax_restores_silently_is_caught_by_the_digest(tmp_path):
    """One bit flipped in a weight's stored data: orbax restores other numbers without
    a word; the digest saved with the checkpoint catches it, and the previous one is
    used."""
    import jax.numpy as jnp
    import numpy as np

    from metarl_jax.checkpoints import CorruptCheckpoint

    weights = {"w": jnp.arange(1000.0)}
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(1, weights, {"env_steps": 1})
    checkpointer.save(2, {"w": 2 * weights["w"]}, {"env_steps": 2})
    flip_middle_bits(tmp_path / "checkpoints" / "2", largest_only=True)
    with pytest.raises(CorruptCheckpoint, match="checkpoint 2 .* does not match the digest"):
        checkpointer.restore(weights, 2)
    silently = checkpointer.manager.restore(2)["state"]["w"]  # orbax alone: no error
    assert not np.array_equal(np.asarray(silently), 2 * np.arange(1000.0))
    iteration, state, host = checkpointer.restore_latest_intact(weights)
    assert (iteration, host) == (1, {"env_steps": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000.0))
    checkpointer.close()


def test_a_corrupt_checkpoint_is_skipped_and_the_run_resumes_from_an_intact_one(
        tmp_path, capfd):
    reference = trainer.train(tiny_config(iterations=5, iterations_per_call=1),
                              progress=False).history
    out = tmp_path / "run"
    trainer.train(tiny_config(iterations=4, checkpoint_every=1), str(out), progress=False)
    flip_middle_bits(out / "checkpoints" / "4")
    capfd.readouterr()
    trainer.train(tiny_config(iterations=5, checkpoint_every=1), str(out), resume=True,
                  progress=False)
    warning = capfd.readouterr().err
    assert f"warning: checkpoint 4 in {out / 'checkpoints'} " in warning
    assert "; skipping it" in warning
    assert without_timing(run_dir.read_metrics(str(out))) == without_timing(reference)


def test_no_intact_checkpoint_is_one_line_and_a_non_zero_exit(tmp_path):
    out = tmp_path / "run"
    trainer.train(tiny_config(iterations=2, checkpoint_every=1), str(out), progress=False)
    for iteration in (1, 2):
        flip_middle_bits(out / "checkpoints" / str(iteration))
    process = cli("train", "--resume", str(out), "--iterations", "3", "--quiet")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_RUN_DIRECTORY
    # orbax's own threads may also write to stderr: the one error line is looked for
    assert stderr.count("error: ") == 1, stderr
    assert (f"error: no intact checkpoint in {out / 'checkpoints'}: 2, 1 cannot be restored "
            "(see the warnings); the run cannot be resumed (start it again without "
            "--resume, with --force)\n") in stderr
    assert len(run_dir.read_metrics(str(out))) == 2  # nothing written was lost


def test_a_phase_too_large_for_the_machine_is_refused_before_compiling(tmp_path):
    process = cli("train", "--set", "horizon=100000000", "--out", str(tmp_path / "run"),
                  "--quiet")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_CONFIG_ERROR
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: config: meta_batch_size, episodes_per_task, horizon: "
                           "M=20, N=20, H=100000000 (K=1) need about ")
    assert "GiB available; reduce M, N or H" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_twenty_random_interruptions_leave_the_record_of_an_uninterrupted_run(tmp_path):
    """SIGKILL, SIGTERM and SIGINT in turn at random moments, each followed by
    --resume: the final metrics equal those of the same run left uninterrupted, with no
    iteration twice and none missing."""
    import random

    args = ["--set", "checkpoint_every=3", *TINY]
    out = tmp_path / "run"
    rng = random.Random(0)
    signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
    # Long enough never to finish on its own; its length is settled at the end.
    process = cli("train", "--iterations", "1000000", "--out", str(out), "--quiet", *args)
    for interruption in range(20):
        while not (out / "config.yaml").exists():
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        assert process.poll() is None, process.communicate()
        process.send_signal(signals[interruption % 3])
        process.communicate(timeout=300)
        process = cli("train", "--resume", str(out), "--quiet")
    time.sleep(rng.uniform(0.0, 3.0))
    process.kill()
    process.communicate()
    iterations = len(run_dir.read_metrics(str(out))) + 5
    finish = cli("train", "--resume", str(out), "--iterations", str(iterations), "--quiet")
    _, stderr = finish.communicate(timeout=600)
    assert finish.returncode == 0, stderr

    reference = tmp_path / "reference"
    done = cli("train", "--iterations", str(iterations), "--out", str(reference), "--quiet",
               *args)
    assert done.wait(timeout=600) == 0
    got, want = run_dir.read_metrics(str(out)), run_dir.read_metrics(str(reference))
    assert [r["iteration"] for r in got] == list(range(1, iterations + 1))
    assert without_timing(got) == without_timing(want)
    assert json.loads((out / run_dir.LOCK_FILE).read_text() or "{}") == {}


def test_a_signal_received_while_starting_up_is_held_for_the_host_loop():
    """Before the host loop's handlers exist (imports, building, compiling), SIGTERM is
    held and the loop's first check sees it."""
    import os

    from metarl_jax import early_signals

    restore = early_signals.hold_from_now()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with trainer.StopSignals() as signals:
            assert signals.received == signal.SIGTERM
            assert signals.stop_requested()
    finally:
        restore()
    assert early_signals.take_pending() is None
