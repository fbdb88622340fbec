"""The host loop's watchdog: a call past its deadline is reported, once, and goes on."""

import io
import time

import pytest

from metarl_jax import watchdog


def quiet(**kwargs):
    stream = io.StringIO()
    return watchdog.Watchdog(stream=stream, enabled=True, **kwargs), stream


def test_a_call_past_its_deadline_is_reported_with_stacks_and_advice_and_finishes():
    dog, stream = quiet(first_call_s=0.05)
    with dog.watch("meta-iteration call 0 (iterations 1-1)"):
        time.sleep(0.4)
        result = "done"
    assert result == "done"  # the call is not interrupted
    text = stream.getvalue()
    assert dog.reports == 1
    assert "still waiting for meta-iteration call 0 (iterations 1-1)" in text
    assert "--cpu-devices" in text and "--resume" in text
    assert "test_a_call_past_its_deadline" in text  # the waiting thread's Python stack
    assert "returned after" in text
    assert text.count("still waiting") == 1


def test_a_call_within_its_deadline_says_nothing():
    dog, stream = quiet(first_call_s=5.0)
    with dog.watch("call 0"):
        time.sleep(0.01)
    assert stream.getvalue() == "" and dog.reports == 0
    assert len(dog.durations) == 1


def test_later_deadlines_follow_the_median_of_recent_calls_with_a_floor():
    dog, _ = quiet(first_call_s=100.0, floor_s=0.5, factor=4.0, window=3)
    assert dog.deadline_s() == 100.0  # nothing measured yet: the compile allowance
    dog.durations.extend([0.1, 0.3, 0.2])
    assert dog.deadline_s() == pytest.approx(0.8)  # 4 x median 0.2
    dog.durations.extend([0.01, 0.01, 0.01])  # the window keeps the last three
    assert dog.deadline_s() == 0.5  # the floor
    assert dog.deadline_s(expected_s=1.0) == 4.0  # an explicit expectation wins


def test_a_slow_call_after_fast_ones_is_reported():
    dog, stream = quiet(first_call_s=10.0, floor_s=0.05, factor=2.0)
    for call in range(3):
        with dog.watch(f"call {call}"):
            time.sleep(0.01)
    assert dog.reports == 0
    with dog.watch("call 3"):
        time.sleep(0.3)
    assert dog.reports == 1 and "still waiting for call 3" in stream.getvalue()
    assert "median of the last 3 calls" in stream.getvalue()


def test_an_exception_passes_through_and_is_not_timed():
    dog, stream = quiet(first_call_s=5.0)
    with pytest.raises(KeyboardInterrupt):
        with dog.watch("call 0"):
            raise KeyboardInterrupt
    assert not dog.durations and stream.getvalue() == ""


def test_the_environment_sets_the_allowances_and_can_turn_it_off(monkeypatch):
    monkeypatch.setenv("METARL_WATCHDOG_FIRST_CALL_S", "7")
    monkeypatch.setenv("METARL_WATCHDOG_FLOOR_S", "3")
    dog = watchdog.Watchdog()
    assert dog.first_call_s == 7.0 and dog.floor_s == 3.0 and dog.enabled
    monkeypatch.setenv("METARL_WATCHDOG", "0")
    off = watchdog.Watchdog(first_call_s=0.01, stream=io.StringIO())
    with off.watch("call 0"):
        time.sleep(0.05)
    assert off.reports == 0


def test_the_module_level_watch_uses_one_shared_watchdog():
    with watchdog.watch("call 0"):
        pass
    with watchdog.watch("call 1", expected_s=1.0):
        pass
    assert len(watchdog._default.durations) >= 2


def test_on_a_real_file_the_stacks_come_from_faulthandler(tmp_path):
    with open(tmp_path / "err.txt", "w") as stream:
        dog = watchdog.Watchdog(first_call_s=0.05, stream=stream, enabled=True)
        with dog.watch("call 0"):
            time.sleep(0.4)
    text = (tmp_path / "err.txt").read_text()
    assert "Current thread" in text or "Thread 0x" in text  # faulthandler's format
    assert "test_watchdog.py" in text and "end of report" in text


def test_the_trainer_watches_its_compiled_calls(monkeypatch, capfd):
    """A first call given no time at all is reported, and the run still completes
    (two fused calls: the second is watched with the deadline the first measured)."""
    from metarl_jax import run_config, trainer

    monkeypatch.setenv("METARL_WATCHDOG_FIRST_CALL_S", "0")
    config = run_config.resolve_config({
        **run_config.DEFAULT_EXPERIMENT, "iterations": 4, "iterations_per_call": 2,
        "meta_batch_size": 2, "episodes_per_task": 2, "horizon": 8, "hidden_sizes": [8, 8]})
    history = trainer.train(config, progress=False).history
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    stderr = capfd.readouterr().err
    assert "meta-iteration call (iterations 1-2)" in stderr
    assert "metarl watchdog: meta-iteration call (iterations 1-2) returned after" in stderr
    assert "iterations 3-4" not in stderr  # its deadline is the floor, 120 s at least
