"""Progress on the console: a redrawn bar on a terminal, plain lines in logs and CI.

    progress = Progress(300, label="step")
    progress.update(10, "loss 5.21", log=True)   # terminal: the bar; otherwise: "step 10/300 | loss 5.21"
    progress.write("step 100: val loss 5.02")    # a line above the bar
    progress.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

REDRAW_SECONDS = 0.1  # a terminal bar is redrawn at most this often (log updates always)


class Progress:
    """Prints only when `enabled` (e.g. on rank 0)."""

    def __init__(self, total: int, *, label: str = "", enabled: bool = True, stream: TextIO | None = None,
                 counter: Callable[[int, int], str] = lambda done, total: f"{done}/{total}") -> None:
        self.total, self.label, self.enabled, self.counter = max(total, 1), label, enabled, counter
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.status = ""
        self.first: int | None = None  # the count when updates began (a resumed run starts mid-way)
        self.started = self.drawn_at = time.perf_counter()
        self.drawn = False

    def update(self, done: int, status: str | None = None, log: bool = False) -> None:
        """`done` of `total`; `status` replaces the text after the count; `log` also prints a plain
        line when the stream is not a terminal."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first, self.started = done, now
        if status is not None:
            self.status = status
        head = f"{self.label} " if self.label else ""
        if self.tty:
            if not log and done < self.total and now - self.drawn_at < REDRAW_SECONDS:
                return
            filled = int(24 * min(done / self.total, 1.0))
            rate = (done - self.first) / max(now - self.started, 1e-9)
            eta = f" | eta {(self.total - done) / rate:.0f}s" if rate > 0 and done < self.total else ""
            self.stream.write(f"\r\x1b[K{head}[{'#' * filled}{'.' * (24 - filled)}] "
                              f"{self.counter(done, self.total)} {self.status}{eta}")
            self.stream.flush()
            self.drawn, self.drawn_at = True, now
        elif log:
            print(f"{head}{self.counter(done, self.total)} | {self.status}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A line printed above the bar."""
        if not self.enabled:
            return
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
