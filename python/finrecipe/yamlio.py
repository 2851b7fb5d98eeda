"""YAML with source positions, and pydantic errors turned into located, helpful messages.

`load_yaml(path)` returns plain Python data plus a map from key paths (tuples of keys and list
indices) to (line, column), 1-based. `validation_error(err, ...)` turns a pydantic
`ValidationError` into a `RecipeError` naming file, line, column and key path, with a
"did you mean ...?" suggestion for unknown keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finrecipe.errors import RecipeError

KeyPath = tuple[str | int, ...]
Positions = dict[KeyPath, tuple[int, int]]


# Limits that make parsing a hostile file fail fast instead of hanging or exhausting memory: a
# recipe or merge config is small, so these are far above any real one.
MAX_VALUES = 200_000  # values constructed, aliases expanded (a "billion laughs" hits this at once)
MAX_DEPTH = 100  # nesting of mappings and sequences
MAX_BYTES = 16 << 20


class _Loader(yaml.SafeLoader):
    budget = MAX_VALUES


def _err(message: str, node: yaml.Node, path: str | None) -> RecipeError:
    return RecipeError(message, line=node.start_mark.line + 1, column=node.start_mark.column + 1, path=path)


def _construct(loader: _Loader, node: yaml.Node, path: KeyPath, pos: Positions) -> Any:
    loader.budget -= 1
    if loader.budget < 0:
        raise _err(f"more than {MAX_VALUES} values (aliases expanded); a recipe or config is far "
                   "smaller: is this an alias bomb?", node, format_path(path) or None)
    if len(path) > MAX_DEPTH:
        raise _err(f"nested more than {MAX_DEPTH} levels deep (or an alias that contains itself)",
                   node, format_path(path[:5]) + " ...")
    pos.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise _err("a key must be a plain value (a string or number), not a mapping or a list",
                           knode, format_path(path) or None)
            key = loader.construct_object(knode, deep=True)
            if key in out:
                raise RecipeError(f"duplicate key {key!r}", line=knode.start_mark.line + 1,
                                  column=knode.start_mark.column + 1, path=format_path(path + (key,)))
            # A key's position is where the key is written (what an editor should jump to).
            pos[path + (key,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
            out[key] = _construct(loader, vnode, path + (key,), pos)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, v, path + (i,), pos) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def loads_yaml(text: str, file: str | None = None) -> tuple[Any, Positions]:
    """Parse YAML text; returns (data, positions). Syntax errors become `RecipeError`s."""
    pos: Positions = {}
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{len(text)} characters: larger than any recipe or config ({MAX_BYTES} at most)",
                          file=file)
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = None if node is None else _construct(loader, node, (), pos)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise RecipeError(f"invalid YAML: {e.problem}", file=file,
                          line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from None
    except yaml.YAMLError as e:  # reader errors (NUL bytes, bad encodings) carry no problem mark
        raise RecipeError(f"invalid YAML: {' '.join(str(e).split())}", file=file) from None
    except RecursionError:
        raise RecipeError(f"invalid YAML: nested too deeply (more than {MAX_DEPTH} levels)", file=file) from None
    except (TypeError, ValueError, OverflowError) as e:  # e.g. an unhashable key, a bad timestamp
        raise RecipeError(f"invalid YAML: {e}", file=file) from None
    except RecipeError as e:
        raise RecipeError(e.message, file=file, line=e.line, column=e.column, path=e.path) from None
    return data, pos


def safe_load_text(text: str, file: str | None = None) -> Any:
    """Data of a YAML document (bounded like `loads_yaml`), without positions."""
    return loads_yaml(text, file)[0]


def load_yaml(path: str | Path) -> tuple[Any, Positions]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("file not found", file=str(p)) from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(p)) from None
    except OSError as e:
        raise RecipeError(f"cannot read: {e.strerror or e}", file=str(p)) from None
    return loads_yaml(text, file=str(p))


def format_path(path: Iterable[str | int]) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def locate(positions: Mapping[KeyPath, tuple[int, int]] | None, path: Sequence[str | int]
           ) -> tuple[int | None, int | None]:
    """Line and column of the longest prefix of `path` that has a position.

    A position of (0, 0) means "known, but not in a file" (e.g. a command-line override): None.
    """
    if not positions:
        return None, None
    p = tuple(path)
    while True:
        if p in positions:
            line, col = positions[p]
            return (line, col) if line else (None, None)
        if not p:
            return None, None
        p = p[:-1]


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for a near miss, else ''."""
    m = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _fields_at(model: type[BaseModel] | None, loc: Sequence[str | int]) -> list[str]:
    """Field names (and aliases) of the pydantic model found by walking `loc` (best effort)."""
    cur: Any = model
    for k in loc:
        if cur is None:
            return []
        if isinstance(k, int):
            continue
        f = getattr(cur, "model_fields", {}).get(k)
        if f is None:  # a key of a dict-valued field (e.g. a model name): stay on the value model
            continue
        cur = _inner_model(f.annotation)
    if cur is None or not hasattr(cur, "model_fields"):
        return []
    names = []
    for n, f in cur.model_fields.items():
        names.append(f.alias or n)
    return names


def _inner_model(tp: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for a in typing.get_args(tp):
        m = _inner_model(a)
        if m is not None:
            return m
    return None


def locate_file(files: Mapping[KeyPath, str] | None, path: Sequence[str | int],
                default: str | None = None) -> str | None:
    """The file that wrote the longest prefix of `path` (recipes merged with `extends`)."""
    if not files:
        return default
    p = tuple(path)
    while True:
        if p in files:
            return files[p]
        if not p:
            return default
        p = p[:-1]


def validation_error(err: ValidationError, *, file: str | None = None,
                     positions: Mapping[KeyPath, tuple[int, int]] | None = None,
                     prefix: KeyPath = (), model: type[BaseModel] | None = None,
                     files: Mapping[KeyPath, str] | None = None) -> RecipeError:
    """The first (most useful) error of a pydantic ValidationError as a located RecipeError.

    `prefix` is where the validated object sits in the file (e.g. ("stages", "fin_cpt")).
    All errors are listed in the message when there are several. `files` (optional) maps key
    paths to the file that wrote them, for data merged from several files; `file` is the default.
    """
    msgs: list[str] = []
    first: tuple[KeyPath, str] | None = None
    # An unknown key usually explains a "missing" one (a typo): report unknown keys first.
    errors = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    for e in errors:
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        # Drop pydantic's union-member tags such as 'MergeStage' that are not keys in the file.
        full = prefix + loc
        if e["type"] == "extra_forbidden":
            key = loc[-1] if loc else ""
            msg = f"unknown key {key!r}" + suggest(str(key), _fields_at(model, loc[:-1]))
        elif e["type"] == "missing":
            msg = "required key missing"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] not in ("value_error", "assertion_error"):
                shown = repr(e["input"])
                if len(shown) < 80:
                    msg += f" (got {shown})"
        line, col = locate(positions, full)
        efile = locate_file(files, full, file)
        where = f"{efile}:{line}:{col}: " if (efile and line) else (f"{efile}: " if efile else "")
        msgs.append(f"{where}{format_path(full)}: {msg}")
        if first is None:
            first = (full, msg)
    assert first is not None
    full, msg = first
    line, col = locate(positions, full)
    if len(msgs) > 1:
        msg += f"\n  ({len(msgs) - 1} more: " + "; ".join(msgs[1:4]) + (" ..." if len(msgs) > 4 else "") + ")"
    return RecipeError(msg, file=locate_file(files, full, file), line=line, column=col,
                       path=format_path(full) or None)
