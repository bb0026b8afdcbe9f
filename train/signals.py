"""Stopping a run cleanly: SIGINT/SIGTERM call `on_stop(signum)` (the trainer then finishes its
step, saves a checkpoint and exits), and the previous handler comes back at once, so a second
signal acts as it would have.

    previous = signals.install(lambda signum: ...)
    ...
    signals.restore(previous)
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


def install(on_stop: Callable[[int], None]) -> dict[int, Any]:
    """Handlers for SIGINT and SIGTERM (none outside the main thread); the previous ones, by signal."""
    previous: dict[int, Any] = {}

    def on_signal(signum, frame):
        on_stop(signum)
        signal.signal(signum, previous[signum])

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, on_signal)
        except ValueError:  # not the main thread: no handlers
            break
    return previous


def restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
