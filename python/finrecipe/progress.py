"""Progress reporting without printing from library code.

Library functions take a `Progress` (default: `NullProgress`); the CLI passes a rich-backed one.
A task is opened with `progress.task(description, total, unit)` and advanced with `update()`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol


class Task(AbstractContextManager["Task"], Protocol):
    def update(self, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, info: str | None = None) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None, unit: str = "it") -> Task: ...

    def log(self, message: str) -> None: ...


class _NullTask:
    def update(self, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, info: str | None = None) -> None:
        return None

    def __enter__(self) -> _NullTask:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


class NullProgress:
    """Reports nothing; the default for library calls."""

    def task(self, description: str, total: float | None = None, unit: str = "it") -> _NullTask:
        return _NullTask()

    def log(self, message: str) -> None:
        return None
