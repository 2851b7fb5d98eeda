"""A `Progress` for logs: one timestamped line per task at a fixed interval.

For when stderr is not a terminal (SLURM, nohup, CI), where a live bar turns into a dump of
truncated redraws. Each task prints at most one line every ``interval``
seconds (the first update prints at once), and one when it ends::

    2026-12-02T10:50:00Z finance: continual pretraining  step 120/800 (15%)  loss 2.3456 lr 1.00e-03 12,345 tok/s  ETA 5m12s

The line holds the task's description, completed/total with its unit, the `info` the task last
reported (the trainer puts loss, lr and tokens/s there) and an ETA from the rate since the task
started (a resumed run counts from where it resumed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from types import TracebackType
from typing import TextIO

from finrecipe.util.fmt import duration


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class LogTask:
    def __init__(self, owner: LogProgress, description: str, total: float | None, unit: str) -> None:
        self.owner = owner
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0.0
        self.info: str | None = None
        self._t0 = owner.clock()
        self._c0: float | None = None  # completed at the first update (a resumed start)
        self._last_print: float | None = None

    def update(self, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, info: str | None = None) -> None:
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        if advance is not None:
            self.completed += advance
        if info is not None:
            self.info = info
        now = self.owner.clock()
        if self._c0 is None:
            self._c0, self._t0 = self.completed, now
        if self._last_print is None or now - self._last_print >= self.owner.interval:
            self._emit(now)

    def line(self, now: float, final: str | None = None) -> str:
        parts = [self.description]
        count = f"{self.unit} {_num(self.completed)}"
        if self.total:
            count += f"/{_num(self.total)} ({100 * self.completed / self.total:.0f}%)"
        parts.append(count)
        if self.info:
            parts.append(self.info)
        if final is not None:
            parts.append(final)
        elif self.total and self._c0 is not None and self.completed > self._c0 and now > self._t0:
            rate = (self.completed - self._c0) / (now - self._t0)
            parts.append(f"ETA {duration(max(self.total - self.completed, 0) / rate)}")
        return "  ".join(parts)

    def _emit(self, now: float, final: str | None = None) -> None:
        self._last_print = now
        self.owner.write(self.line(now, final))

    def __enter__(self) -> LogTask:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        now = self.owner.clock()
        took = duration(now - self._t0)
        self._emit(now, f"done in {took}" if et is None else f"stopped after {took}")


class LogProgress:
    """`finrecipe.progress.Progress` as plain timestamped lines on `stream` (default stderr)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.now = now

    def write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stamp = self.now().astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        stream.write(f"{stamp} {text}\n")
        stream.flush()

    def task(self, description: str, total: float | None = None, unit: str = "it") -> LogTask:
        return LogTask(self, description, total, unit)

    def log(self, message: str) -> None:
        self.write(message)
