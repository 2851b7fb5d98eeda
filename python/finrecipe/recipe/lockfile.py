"""The lockfile (`RECIPE.lock`): what every source resolved to (hub commits, file hashes).

Written by `lock` and `apply` (unless --locked / --no-lock), compared by `apply --locked`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finrecipe import __version__
from finrecipe.errors import LockMismatchError, RecipeError
from finrecipe.recipe.graph import RecipeGraph
from finrecipe.util.fs import write_text_atomic


def load_lock(recipe: RecipeGraph) -> dict[str, Any] | None:
    import yaml

    from finrecipe.yamlio import safe_load_text

    p = recipe.lock_path
    if not p.is_file():
        return None
    try:
        d = safe_load_text(p.read_text(encoding="utf-8"), str(p))
    except (OSError, yaml.YAMLError, ValueError, RecipeError) as e:
        raise LockMismatchError(f"{p}: unreadable lockfile ({e}); delete it and run `finrecipe lock`"
                                ) from None
    return d if isinstance(d, dict) else None


def lock_document(recipe: RecipeGraph, entries: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The lockfile's content from each source node's lock entry."""
    doc: dict[str, Any] = {"finrecipe_version": __version__, "recipe": recipe.name,
                           "models": {}, "datasets": {}}
    for node in recipe:
        e = entries.get(node.name)
        if e is None or node.section == "stages":
            continue
        doc[node.section][node.name] = copy.deepcopy(e)
    return doc


def compare_lock(lock: Mapping[str, Any] | None, doc: Mapping[str, Any], lock_path: Path) -> list[str]:
    """What resolves differently from the lockfile (empty when nothing does)."""
    if lock is None:
        return [f"there is no lockfile {lock_path.name}; run `finrecipe lock` (or `apply` without --locked)"]
    diffs: list[str] = []
    for section in ("models", "datasets"):
        old = lock.get(section) or {}
        new = doc.get(section) or {}
        for name in new:
            if name not in old:
                diffs.append(f"{section}.{name}: not in the lockfile")
                continue
            o, n = old[name], new[name]
            for k in sorted(set(o) | set(n)):
                if k == "files":
                    if "files" in o and "files" in n:
                        diffs.extend(_diff_files(f"{section}.{name}", o["files"], n["files"]))
                    continue
                if o.get(k) != n.get(k):
                    diffs.append(f"{section}.{name}.{k}: locked {o.get(k)!r}, now {n.get(k)!r}")
        for name in old:
            if name not in new:
                diffs.append(f"{section}.{name}: in the lockfile but no longer in the recipe")
    return diffs


def _diff_files(where: str, old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    o = {f["path"]: f for f in old}
    n = {f["path"]: f for f in new}
    out = []
    for p in sorted(set(o) | set(n)):
        if p not in o:
            out.append(f"{where}: file {p} is new (not in the lockfile)")
        elif p not in n:
            out.append(f"{where}: file {p} is locked but no longer matched")
        elif o[p].get("sha256") != n[p].get("sha256"):
            out.append(f"{where}: file {p} changed (size {o[p].get('size')} → {n[p].get('size')}, "
                       f"sha256 {str(o[p].get('sha256'))[:12]} → {str(n[p].get('sha256'))[:12]})")
    return out


def mismatch_message(recipe: RecipeGraph, diffs: list[str]) -> str:
    return (f"{recipe.lock_path}: the recipe no longer resolves as locked:\n  - " + "\n  - ".join(diffs)
            + "\nrun without --locked to update the lockfile, or restore the locked inputs")


def write_lock_file(path: Path, doc: Mapping[str, Any]) -> None:
    import yaml

    text = ("# Written by finrecipe (`finrecipe lock` / `apply`): what this recipe resolved to.\n"
            "# Commit it with the recipe; `finrecipe apply --locked` refuses to run when anything differs.\n"
            + yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True))
    write_text_atomic(path, text)


def same_lock(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a.get("models") or {}) == (b.get("models") or {}) and \
        (a.get("datasets") or {}) == (b.get("datasets") or {}) and \
        a.get("finrecipe_version") == b.get("finrecipe_version") and a.get("recipe") == b.get("recipe")


def update_lock(recipe: RecipeGraph, lock: Mapping[str, Any] | None, doc: Mapping[str, Any]) -> bool:
    """Rewrite the lockfile when `doc` differs from it; whether it was written."""
    if lock is not None and same_lock(lock, doc):
        return False
    write_lock_file(recipe.lock_path, doc)
    return True
