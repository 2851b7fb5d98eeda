"""The exception hierarchy. Every error finrecipe raises on purpose is a `FinrecipeError`.

The Rust core (`finrecipe._core`) raises these same classes. The CLI turns them into a message and
an exit code: 2 for bad input (`BadInput` subclasses), 1 for failures, 130 for Ctrl-C.
"""

from __future__ import annotations


class FinrecipeError(Exception):
    """Base of every error finrecipe raises on purpose."""

    exit_code = 1


class BadInput(FinrecipeError):
    """The user's input (config, recipe, model files, data) is wrong; exit code 2."""

    exit_code = 2


class ConfigError(BadInput):
    """A config, recipe or parameter is invalid (unknown key, wrong type, bad value)."""


class FormatError(BadInput):
    """A file is not in the expected format (corrupt safetensors header, bad index, bad JSON)."""


class MismatchError(BadInput):
    """Inputs that must agree do not (tensor shapes, dtypes, vocabulary sizes, missing tensors)."""


class DataError(BadInput):
    """A dataset is unusable (missing field, empty file, undecodable line)."""


class IoError(FinrecipeError):
    """Reading or writing failed (disk full, permission denied, file vanished)."""


class StageError(FinrecipeError):
    """A recipe stage failed while running."""


class PermissionDenied(BadInput):
    """A recipe asks for something (running a model's code, a network host, a path outside its
    directories) that the person running it has not allowed."""


class LockMismatchError(FinrecipeError):
    """`apply --locked`: something resolves differently from the lockfile."""

    exit_code = 2


class RecipeError(ConfigError):
    """A recipe is invalid. Carries the location (file, line, column, key path) when known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        path: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.path = path
        where = ""
        if file:
            where = file
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        key = f"{path}: " if path else ""
        super().__init__(f"{where}{key}{message}")


__all__ = [
    "BadInput",
    "ConfigError",
    "DataError",
    "FinrecipeError",
    "FormatError",
    "IoError",
    "LockMismatchError",
    "MismatchError",
    "PermissionDenied",
    "RecipeError",
    "StageError",
]
