"""The `finrecipe` command line. Commands live in sibling modules and hold no logic of their own:
they parse options, call the library, and present results. Heavy imports happen inside commands.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from finrecipe import __version__

# Each module defines click commands and lists them in `COMMANDS`.
_COMMAND_MODULES = ("merge", "recipe", "evaluate", "convert")


class _Group(click.Group):
    """Turns finrecipe errors into a one-line message and an exit code; never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from finrecipe.errors import FinrecipeError

        try:
            return super().invoke(ctx)
        except FinrecipeError as e:
            from finrecipe.cli.ui import console_err  # rich only where a message is printed

            console_err().print(f"[bold red]error:[/] {_escape(str(e))}", soft_wrap=True)  # one line: greppable
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            from finrecipe.cli.ui import console_err

            console_err().print("[yellow]interrupted[/]: nothing half-written was left behind; "
                                "run the same command again to continue.")
            sys.exit(130)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finrecipe")
def main() -> None:
    """finrecipe: build domain instruction-tuned LLMs from a declarative recipe.

    Continual pretraining on domain text + the public instruction vector added by model merging
    (Hirano & Imajo, 2024), with a Rust merge core and finance benchmarks.
    """


for _name in _COMMAND_MODULES:
    for _cmd in importlib.import_module(f"finrecipe.cli.{_name}").COMMANDS:
        main.add_command(_cmd)
