"""A watchdog for the host loop's compiled calls: says so on stderr when one never returns.

A compiled call that deadlocks inside XLA (the CPU runtime can, see
docs/troubleshooting.md) leaves the process alive and idle, with no metrics line and no
error. The host loop wraps each compiled call, including the wait for its result, in
`Watchdog.watch`; if the call has not returned after its deadline, one message goes to
stderr: what was being waited for, for how long, the Python stacks of every thread, and
what to do. The run is not stopped (a slow call may still finish, and the message is
then followed by one saying how long it took).

Use, in the host loop::

    from metarl_jax import watchdog

    dog = watchdog.Watchdog()                      # or Watchdog(first_call_s=1800)
    for call in range(num_calls):
        with dog.watch(f"meta-iteration call {call} (iterations {a}-{b})"):
            state, metrics = step(state)
            jax.block_until_ready(metrics)         # the wait belongs inside the block

The deadline of a call is, in seconds,

- with `expected_s` given: max(`floor_s`, `factor` * expected_s);
- else, before any call has finished: `first_call_s` (default 600), since the first call
  also compiles and nothing is known about its length;
- else: max(`floor_s`, `factor` * the median of the last `window` call times).

Only calls that returned feed the median, so a call watched with `expected_s` counts
like any other. Defaults: factor 10, floor 120 s, window 5. `METARL_WATCHDOG_FIRST_CALL_S`
and `METARL_WATCHDOG_FLOOR_S` override the first-call and floor values of a
`Watchdog()` built without them; `METARL_WATCHDOG=0` turns every watchdog off.

`Watchdog.deadline_s(expected_s=None)` returns the deadline the next call would get,
`Watchdog.durations` the call times seen (seconds, oldest first), and
`Watchdog.reports` how many stall messages were written.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import IO, Iterator

FIRST_CALL_S = 600.0
FLOOR_S = 120.0
FACTOR = 10.0
WINDOW = 5

ADVICE = (
    "The process is still running; it is not stopped by this message. If it uses no CPU, "
    "XLA is most likely deadlocked and the call will never return: stop it (the last "
    "checkpoint is kept, continue with `metarl train --resume OUT`), and if the run split "
    "the CPU (`--cpu-devices`, jax_num_cpu_devices or "
    "--xla_force_host_platform_device_count), run again without the split. If the stall "
    "persists, report it with this message and the command line "
    "(docs/troubleshooting.md).")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return float(value)
    except ValueError:
        return default


class Watchdog:
    """Deadlines for a sequence of compiled calls; see the module docstring."""

    def __init__(self, first_call_s: float | None = None, floor_s: float | None = None,
                 factor: float = FACTOR, window: int = WINDOW, stream: IO[str] | None = None,
                 enabled: bool | None = None):
        self.first_call_s = (first_call_s if first_call_s is not None
                             else _env_float("METARL_WATCHDOG_FIRST_CALL_S", FIRST_CALL_S))
        self.floor_s = (floor_s if floor_s is not None
                        else _env_float("METARL_WATCHDOG_FLOOR_S", FLOOR_S))
        self.factor = factor
        self.durations: deque[float] = deque(maxlen=window)
        self.reports = 0
        self._stream = stream
        self.enabled = (enabled if enabled is not None
                        else os.environ.get("METARL_WATCHDOG", "1").strip() != "0")

    def deadline_s(self, expected_s: float | None = None) -> float:
        """Seconds the next call may take before it is reported."""
        if expected_s is not None:
            return max(self.floor_s, self.factor * expected_s)
        if not self.durations:
            return self.first_call_s
        return max(self.floor_s, self.factor * statistics.median(self.durations))

    @contextlib.contextmanager
    def watch(self, what: str, expected_s: float | None = None) -> Iterator[None]:
        """Watches the block: reports on stderr if it runs past `deadline_s(expected_s)`.

        `what` names the call in the message ("meta-iteration call 12 (iterations
        12-16)"). The block's time is recorded when it returns normally."""
        if not self.enabled:
            yield
            return
        deadline = self.deadline_s(expected_s)
        start = time.monotonic()
        returned = threading.Event()
        reported = threading.Event()

        def guard():
            if not returned.wait(deadline):
                reported.set()
                self._report(what, time.monotonic() - start, deadline)

        thread = threading.Thread(target=guard, name="metarl-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            returned.set()
            thread.join()
        elapsed = time.monotonic() - start
        self.durations.append(elapsed)
        if reported.is_set():
            self._write(f"metarl watchdog: {what} returned after {elapsed:.0f} s; "
                        "the run goes on.\n")

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed stream must not kill the run
            pass

    def _report(self, what: str, waited_s: float, deadline_s: float) -> None:
        self.reports += 1
        stream = self._stream or sys.stderr
        basis = ("the first call compiles, so it gets a fixed allowance"
                 if not self.durations else
                 f"{self.factor:g} x the median of the last {len(self.durations)} calls, "
                 f"at least {self.floor_s:g} s")
        self._write(
            f"\nmetarl watchdog: still waiting for {what} after {waited_s:.0f} s "
            f"(deadline {deadline_s:.0f} s: {basis}).\n{ADVICE}\n"
            "Python stacks of all threads:\n")
        try:
            faulthandler.dump_traceback(file=stream, all_threads=True)
        except (AttributeError, OSError, ValueError):
            # no file descriptor (a StringIO in tests, say): Python-level stacks instead
            import traceback

            frames = sys._current_frames()
            for thread in threading.enumerate():
                frame = frames.get(thread.ident)
                if frame is not None:
                    self._write(f"Thread {thread.name} ({thread.ident}):\n"
                                + "".join(traceback.format_stack(frame)))
        self._write("metarl watchdog: end of report.\n")


_default: Watchdog | None = None


def watch(what: str, expected_s: float | None = None):
    """`Watchdog.watch` on one process-wide watchdog (created on first use)."""
    global _default
    if _default is None:
        _default = Watchdog()
    return _default.watch(what, expected_s)
