"""Plug-ins from other packages: the modules an entry-point group names, imported once."""

from __future__ import annotations

import importlib

from finrecipe.errors import ConfigError

_loaded: set[str] = set()


def import_entry_points(group: str, what: str) -> None:
    """Import every module of entry-point `group` (importing registers what it defines), once per
    process. A plug-in that fails to import is a one-line ConfigError naming it (`what`: "kind",
    "suite")."""
    if group in _loaded:
        return
    _loaded.add(group)
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as e:  # a broken plug-in must not break the built-in ones silently
            raise ConfigError(f"finrecipe {what} plug-in {ep.name!r} ({ep.value}) failed to import: "
                              f"{type(e).__name__}: {e}") from None
