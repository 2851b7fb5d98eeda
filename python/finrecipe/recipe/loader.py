"""Reading a recipe: YAML with positions, `extends:` (deep merge), and `--set` overrides.

The result keeps, for every key path, the line/column where it was written and the file that
wrote it, so that errors point at the right place even when a value was inherited from a parent
recipe or came from the command line (then the "file" is the `--set` expression).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finrecipe.errors import RecipeError
from finrecipe.yamlio import KeyPath, Positions, format_path, load_yaml, locate, locate_file, suggest

MAX_EXTENDS_DEPTH = 32


@dataclass
class Loaded:
    """Raw recipe data after `extends` and `--set`, with where each key came from."""

    file: Path  # the recipe file given by the user (absolute)
    data: dict[str, Any]
    lines: Positions = field(default_factory=dict)
    files: dict[KeyPath, str] = field(default_factory=dict)
    parents: list[Path] = field(default_factory=list)  # every file read through `extends`

    def where(self, path: KeyPath) -> dict[str, Any]:
        """Keyword arguments for RecipeError locating `path`."""
        line, col = locate(self.lines, path)
        return {"file": locate_file(self.files, path, str(self.file)), "line": line, "column": col,
                "path": format_path(path) or None}

    def base_dir(self, path: KeyPath) -> Path:
        """Directory against which a relative path written at `path` resolves."""
        f = locate_file(self.files, path, str(self.file))
        if f is None or f.startswith("--set"):
            return self.file.parent
        return Path(f).parent


def _drop_under(d: dict[KeyPath, Any], prefix: KeyPath) -> None:
    n = len(prefix)
    for k in [k for k in d if k[:n] == prefix]:
        del d[k]


def _copy_under(src: dict[KeyPath, Any], dst: dict[KeyPath, Any], prefix: KeyPath) -> None:
    n = len(prefix)
    for k, v in src.items():
        if k[:n] == prefix:
            dst[k] = v


def _merge_into(base: Loaded, over: Loaded) -> None:
    """Deep-merge `over` into `base`: over's keys win, mappings merge, `key: null` deletes."""

    def rec(bd: dict[str, Any], od: dict[str, Any], path: KeyPath) -> None:
        for k, v in od.items():
            kp = path + (k,)
            if v is None and k in bd:
                del bd[k]
                _drop_under(base.lines, kp)
                _drop_under(base.files, kp)
                continue
            if isinstance(v, dict) and isinstance(bd.get(k), dict):
                base.lines[kp] = over.lines.get(kp, base.lines.get(kp, (0, 0)))
                base.files[kp] = over.files.get(kp, base.files.get(kp, ""))
                rec(bd[k], v, kp)
            else:
                bd[k] = copy.deepcopy(v)
                _drop_under(base.lines, kp)
                _drop_under(base.files, kp)
                _copy_under(over.lines, base.lines, kp)
                _copy_under(over.files, base.files, kp)

    rec(base.data, over.data, ())


def _read_one(path: Path, stack: tuple[Path, ...]) -> Loaded:
    data, pos = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping (finrecipe: 1, name: ..., models: ...)",
                          file=str(path), line=1, column=1)
    here = Loaded(file=path, data=data, lines=dict(pos), files={k: str(path) for k in pos})
    here.files[()] = str(path)
    ext = data.pop("extends", None)
    if ext is None:
        return here
    if isinstance(ext, str):
        exts = [ext]
    elif isinstance(ext, list) and all(isinstance(e, str) for e in ext):
        exts = list(ext)
    else:
        raise RecipeError("'extends' must be a file name or a list of file names", **here.where(("extends",)))
    merged = Loaded(file=path, data={}, lines={}, files={})
    for i, e in enumerate(exts):
        kp: KeyPath = ("extends",) if isinstance(ext, str) else ("extends", i)
        parent = Path(os.path.normpath(path.parent / e))
        if parent.resolve() in {p.resolve() for p in (*stack, path)}:
            chain = " -> ".join(p.name for p in (*stack, path, parent))
            raise RecipeError(f"'extends' forms a cycle: {chain}", **here.where(kp))
        if not parent.is_file():
            raise RecipeError(f"extended recipe not found: {parent}; paths in 'extends' are relative to "
                              "the file that writes them", **here.where(kp))
        if len(stack) >= MAX_EXTENDS_DEPTH:
            raise RecipeError(f"'extends' chains more than {MAX_EXTENDS_DEPTH} files", **here.where(kp))
        loaded = _read_one(parent, (*stack, path))
        _merge_into(merged, loaded)
        merged.parents.extend([parent, *loaded.parents])
    _drop_under(here.lines, ("extends",))
    _drop_under(here.files, ("extends",))
    _merge_into(merged, here)
    merged.lines.setdefault((), (1, 1))
    merged.files[()] = str(path)
    return merged


def read_recipe(path: str | Path) -> Loaded:
    p = Path(os.path.normpath(Path(path).absolute()))
    if not p.is_file():
        raise RecipeError("recipe file not found", file=str(p))
    return _read_one(p, ())


def apply_override(loaded: Loaded, expr: str, *, top_fields: dict[str, Any],
                   entry_fields: dict[str, list[str]]) -> None:
    """Apply one `--set a.b.c=value` (the value is parsed as YAML).

    `top_fields` are the recipe's top-level keys; `entry_fields` the keys of a model/dataset entry
    per section. Paths that cannot exist in the schema are errors (named sections must name an
    existing entry); keys inside stage bodies are checked by the stage kind's schema afterwards.
    """
    label = f"--set {expr}"
    if "=" not in expr:
        raise RecipeError("expected KEY.PATH=VALUE", file=label)
    keystr, raw = expr.split("=", 1)
    keys = [k for k in keystr.strip().split(".")]
    if not keystr.strip() or any(not k for k in keys):
        raise RecipeError(f"bad key path {keystr!r}: use dots between keys, e.g. "
                          "stages.cpt.optimizer.lr=1e-6", file=label)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"value is not valid YAML: {e}", file=label) from None

    top = keys[0]
    if top not in top_fields or top == "extends":
        raise RecipeError(f"no such key {top!r} in a recipe"
                          + suggest(top, [k for k in top_fields if k != "extends"]), file=label,
                          path=top)
    if top in ("models", "datasets", "stages"):
        if len(keys) < 3:
            raise RecipeError(f"set a field of an entry, e.g. {top}.NAME.FIELD=VALUE", file=label,
                              path=keystr)
        section = loaded.data.get(top) or {}
        if keys[1] not in section:
            raise RecipeError(f"no {top[:-1]} named {keys[1]!r} in the recipe"
                              + suggest(keys[1], section), file=label, path=f"{top}.{keys[1]}")
        if top in entry_fields and keys[2] not in entry_fields[top]:
            raise RecipeError(f"unknown key {keys[2]!r}" + suggest(keys[2], entry_fields[top]),
                              file=label, path=".".join(keys[:3]))
    elif len(keys) > 1:
        raise RecipeError(f"{top!r} has no sub-keys", file=label, path=keystr)

    cur: Any = loaded.data
    path: KeyPath = ()
    created: list[KeyPath] = []  # keys this override adds: located at "--set" too
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        key: str | int = k
        if isinstance(cur, list):
            if not k.isdigit() or int(k) >= len(cur):
                raise RecipeError(f"{format_path(path)} is a list of {len(cur)} items; {k!r} is not an "
                                  "index into it", file=label, path=format_path(path))
            key = int(k)
        elif not isinstance(cur, dict):
            raise RecipeError(f"cannot set {keystr}: {format_path(path)} is a {type(cur).__name__}, "
                              "not a mapping", file=label, path=format_path(path))
        path = path + (key,)
        if isinstance(cur, dict) and key not in cur:
            created.append(path)
        if last:
            cur[key] = value
        else:
            if isinstance(cur, dict) and (key not in cur or cur[key] is None):
                cur[key] = {}
            cur = cur[key]
    _drop_under(loaded.lines, path)
    _drop_under(loaded.files, path)
    for p in {*created, path}:
        loaded.lines[p] = (0, 0)
        loaded.files[p] = label

