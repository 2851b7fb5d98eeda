"""The package and its extension import, and the CLI answers."""

from click.testing import CliRunner

import finrecipe
import finrecipe._core as core
from finrecipe.cli import main
from finrecipe.errors import BadInput, ConfigError, FinrecipeError, FormatError, MismatchError


def test_extension_version_matches_package() -> None:
    assert core.__version__ == finrecipe.__version__


def test_error_hierarchy_exit_codes() -> None:
    for cls in (ConfigError, FormatError, MismatchError):
        assert issubclass(cls, BadInput) and issubclass(cls, FinrecipeError)
        assert cls.exit_code == 2
    assert FinrecipeError.exit_code == 1


def test_cli_help_and_version() -> None:
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and finrecipe.__version__ in r.output
