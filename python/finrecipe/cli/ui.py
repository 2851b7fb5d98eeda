"""Presentation helpers for the CLI: consoles and a rich-backed `Progress`."""

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
