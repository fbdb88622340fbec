"""Signals that arrive while a run starts up, held for its host loop.

`metarl train` calls `hold_from_now()` before anything imports JAX. From then on SIGTERM
and SIGINT are recorded instead of raising wherever the interpreter happens to be: a
KeyboardInterrupt raised inside one of JAX's garbage-collection callbacks is silently
dropped, and the run would go on as if never interrupted. The trainer's host loop takes
the held signal (`take_pending`) and stops at its first safe point. A second Ctrl-C while
starting up stops at once.
"""

from __future__ import annotations

import signal
import threading

_pending: list[int] = []


def _hold(signum, frame):
    if signum == signal.SIGINT and signal.SIGINT in _pending:
        raise KeyboardInterrupt
    _pending.append(signum)


def hold_from_now():
    """Installs the holding handlers; returns a function that puts back the previous
    ones (and forgets a held signal)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.signal(signum, _hold)
                for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _pending.clear()

    return restore


def take_pending() -> int | None:
    """The first signal held since `hold_from_now`, or None; clears it."""
    if not _pending:
        return None
    first = _pending[0]
    _pending.clear()
    return first
