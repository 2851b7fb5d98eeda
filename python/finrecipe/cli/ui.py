"""Presentation helpers for the CLI: consoles, and the `Progress` a command reports to: rich bars on a
terminal, timestamped lines at a fixed interval otherwise (SLURM, nohup, CI logs)."""

from __future__ import annotations

import functools
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress

from finrecipe.progress_log import LogTask


@functools.cache
def console() -> Console:
    return Console()


@functools.cache
def console_err() -> Console:
    return Console(stderr=True)


class _RichTask:
    def __init__(self, owner: RichProgress, tid: TaskID) -> None:
        self._owner = owner
        self._tid = tid

    def update(self, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, info: str | None = None) -> None:
        kw: dict[str, object] = {}
        if advance is not None:
            kw["advance"] = advance
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        if info is not None:
            kw["info"] = info
        self._owner._bar.update(self._tid, **kw)  # type: ignore[arg-type]

    def __enter__(self) -> _RichTask:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._owner._bar.stop_task(self._tid)
        if et is None:
            task = self._owner._bar.tasks[self._tid]
            if task.total is not None:
                self._owner._bar.update(self._tid, completed=task.total)


class RichProgress:
    """A `finrecipe.progress.Progress` that draws rich progress bars (to stderr)."""

    def __init__(self, *, quiet: bool = False) -> None:
        self._bar = _RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console_err(),
            disable=quiet,
            transient=False,
        )
        self._t0 = time.monotonic()

    def __enter__(self) -> RichProgress:
        self._bar.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._bar.stop()

    def task(self, description: str, total: float | None = None, unit: str = "it") -> _RichTask:
        return _RichTask(self, self._bar.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        self._bar.console.print(message)


class _PlainLogProgress:
    """`LogProgress` with rich markup stripped from messages (logs hold plain text)."""

    def __init__(self, interval: float) -> None:
        from finrecipe.progress_log import LogProgress

        self._inner = LogProgress(interval=interval)

    def __enter__(self) -> _PlainLogProgress:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def task(self, description: str, total: float | None = None, unit: str = "it") -> LogTask:
        return self._inner.task(description, total, unit)

    def log(self, message: str) -> None:
        from rich.text import Text

        self._inner.log(Text.from_markup(message).plain)


def progress_for(*, quiet: bool = False, interval: float | None = None) -> RichProgress | _PlainLogProgress:
    """Rich bars when stderr is a terminal; else one timestamped line per task every `interval`
    seconds (default 30, or FINRECIPE_PROGRESS_INTERVAL)."""
    import os
    import sys

    if quiet or sys.stderr.isatty():
        return RichProgress(quiet=quiet)
    iv = interval if interval is not None else float(os.environ.get("FINRECIPE_PROGRESS_INTERVAL", "30"))
    return _PlainLogProgress(iv)
