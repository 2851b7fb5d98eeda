"""A validated recipe as plain data: its nodes (each with its kind and validated config), the
references between them and the execution order. Nothing here runs, resolves or writes anything.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from finrecipe.errors import ConfigError, RecipeError
from finrecipe.node import SECTIONS, CheckContext, NodeKind, Section, get_kind, known_types
from finrecipe.recipe.loader import Loaded
from finrecipe.recipe.schema import NODE_NAME_RE, RecipeSchema
from finrecipe.types import InputKind, Provides, Request
from finrecipe.yamlio import KeyPath, format_path, suggest, validation_error


@dataclass
class Node:
    """One node of the recipe DAG: a model source, a dataset source or a stage."""

    name: str
    section: Section
    kind: NodeKind[Any]
    config: BaseModel
    index: int  # declaration order (ties in the execution order are broken by it)
    deps: list[str] = field(default_factory=list)
    dep_paths: dict[str, KeyPath] = field(default_factory=dict)  # where each reference is written
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> str:
        """The stage type; "model" / "dataset" for sources (as plan, run records and reports show)."""
        return self.kind.type if self.section == "stages" else self.section[:-1]

    @property
    def provides(self) -> Provides:
        return self.kind.provides

    @property
    def key_path(self) -> KeyPath:
        return (self.section, self.name)


def _find_value(obj: Any, value: str, path: KeyPath) -> KeyPath | None:
    """Key path of the first leaf equal to `value` (where a reference is written)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == value:  # a name used as a key (e.g. `datasets: {corpus: 0.7}`)
                return path + (k,)
            r = _find_value(v, value, path + (k,))
            if r is not None:
                return r
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            r = _find_value(v, value, path + (i,))
            if r is not None:
                return r
    elif obj == value:
        return path
    return None


_WHAT = {"model": "a model", "dataset": "a dataset", "none": "a stage with no model output"}


class RecipeGraph:
    """A loaded, validated recipe (plain data). `finrecipe.load_recipe` returns its subclass
    `finrecipe.recipe.api.Recipe`, which adds validate / plan / apply / lock."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.file = loaded.file
        self.recipe_dir = loaded.file.parent
        # where `apply` / `lock` read and write the lockfile (`load_recipe(..., lock_file=...)`)
        self.lock_path: Path = self.file.with_name(self.file.name + ".lock")
        try:
            self.schema = RecipeSchema.model_validate(loaded.data)
        except ValidationError as e:
            raise validation_error(e, file=str(self.file), positions=loaded.lines, files=loaded.files,
                                   model=RecipeSchema) from None
        self.name = self.schema.name
        if self.schema.workdir:
            self.workdir = (loaded.base_dir(("workdir",)) / self.schema.workdir).absolute()
        else:
            self.workdir = self.recipe_dir / "runs" / self.name
        self.nodes: dict[str, Node] = {}
        self._build_nodes()
        self._check_refs()
        self.order: list[str] = self._toposort()

    # ------------------------------------------------------------------ construction

    def error(self, message: str, path: KeyPath) -> RecipeError:
        return RecipeError(message, **self.loaded.where(path))

    def relocate(self, e: RecipeError) -> RecipeError:
        """Point an error raised with a single file at the file that really wrote the key."""
        if not e.path:
            return e
        for kp in self.loaded.lines:
            if format_path(kp) == e.path:
                return RecipeError(e.message, **self.loaded.where(kp))
        return e

    def _build_nodes(self) -> None:
        idx = 0
        seen: dict[str, str] = {}
        for section in SECTIONS:
            entries: dict[str, Any] = getattr(self.schema, section)
            for name, body in entries.items():
                kp: KeyPath = (section, name)
                if not isinstance(name, str) or not NODE_NAME_RE.match(name):
                    raise self.error(f"bad name {name!r}: use letters, digits, '_' and '-' (names become "
                                     "directory names and --set paths)", kp)
                if name in seen:
                    raise self.error(f"name {name!r} is already used by {seen[name]}.{name}; model, dataset "
                                     "and stage names share one namespace", kp)
                seen[name] = section
                self.nodes[name] = self._node(section, name, body, idx)
                idx += 1

    def _kind_of(self, section: Section, name: str, body: dict[str, Any]) -> tuple[NodeKind[Any], dict[str, Any]]:
        kp: KeyPath = (section, name)
        if section == "stages":
            body = dict(body)
            typ = body.pop("type", None)
            known = known_types("stages")
            if typ is None:
                raise self.error(f"required key 'type' missing (one of: {', '.join(known)})", kp)
            if not isinstance(typ, str):
                raise self.error(f"'type' must be a string (got {typ!r})", kp + ("type",))
            try:
                return get_kind("stages", typ), body
            except ConfigError as e:
                if typ not in known:
                    raise self.error(f"unknown stage type {typ!r}" + suggest(typ, known)
                                     + f"; known types: {', '.join(known)}", kp + ("type",)) from None
                raise self.error(str(e), kp + ("type",)) from None
        kinds = [get_kind(section, t) for t in known_types(section)]
        claimed = [k for k in kinds if k.claims(body)]
        if not claimed:
            fields: dict[str, None] = {}
            for k in kinds:
                fields.update(dict.fromkeys(k.Config.model_fields))
            for key in body:
                if key not in fields:
                    raise self.error(f"unknown key {key!r}" + suggest(str(key), list(fields))
                                     + f"; allowed: {', '.join(fields)}", kp + (key,))
        if len(claimed) != 1:
            what = "a model" if section == "models" else "a dataset"
            keys = [k.type for k in kinds]
            names = ", ".join(f"'{k}'" for k in keys[:-1]) + f" or '{keys[-1]}'"
            got = [k.type for k in claimed]
            raise self.error(f"{what} needs exactly one of {names}" + (f" (got {', '.join(got)})" if got else ""),
                             kp)
        return claimed[0], body

    def _node(self, section: Section, name: str, body: Any, idx: int) -> Node:
        kp: KeyPath = (section, name)
        if not isinstance(body, dict):
            raise self.error("a stage must be a mapping with a 'type' key" if section == "stages"
                             else f"a {section[:-1]} must be a mapping", kp)
        kind, body = self._kind_of(section, name, body)
        ctx = {"file": str(self.file), "positions": self.loaded.lines, "files": self.loaded.files,
               "prefix": kp, "recipe_dir": self.base_dir(name), "protected": tuple(self.schema.protected)}
        try:
            config = kind.Config.model_validate(body, context=ctx)
        except ValidationError as e:
            raise validation_error(e, file=str(self.file), positions=self.loaded.lines,
                                   files=self.loaded.files, prefix=kp, model=kind.Config) from None
        except RecipeError as e:
            raise self.relocate(e) from None
        return Node(name, section, kind, config, idx, raw=body)

    def _check_refs(self) -> None:
        for node in self.nodes.values():
            refs: list[tuple[str, InputKind, KeyPath]] = []
            for in_name, in_kind in node.kind.optional_inputs(node.config):
                if in_name in self.nodes:
                    refs.append((in_name, in_kind, _find_value(node.raw, in_name, node.key_path)
                                 or node.key_path))
            for in_name, in_kind in node.kind.inputs(node.config):
                where = _find_value(node.raw, in_name, node.key_path) or node.key_path
                refs.append((in_name, in_kind, where))
            for ref, expected, where in refs:
                target = self.nodes.get(ref)
                if target is None:
                    pool = [n.name for n in self.nodes.values()
                            if (n.provides == expected) and n.name != node.name]
                    raise self.error(f"unknown {expected} {ref!r}" + suggest(ref, pool)
                                     + (f"; {expected}s in this recipe: {', '.join(pool)}" if pool else ""),
                                     where)
                if target.provides != expected:
                    raise self.error(f"{ref!r} is {_WHAT[target.provides]} ({target.section}.{ref}), but "
                                     f"{_WHAT[expected]} is expected here", where)
                if ref == node.name:
                    raise self.error(f"stage {ref!r} refers to itself", where)
                if ref not in node.deps:
                    node.deps.append(ref)
                    node.dep_paths[ref] = where

    def _toposort(self) -> list[str]:
        # Cycles first, so that the error names the whole cycle.
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(n: str) -> None:
            state[n] = 1
            stack.append(n)
            for d in self.nodes[n].deps:
                if state.get(d) == 1:
                    cyc = stack[stack.index(d):] + [d]
                    first, second = cyc[0], cyc[1]
                    raise self.error("dependency cycle: " + " -> ".join(cyc) + "; a stage cannot use "
                                     "its own output, directly or indirectly",
                                     self.nodes[first].dep_paths[second])
                if d not in state:
                    visit(d)
            stack.pop()
            state[n] = 2

        for n in self.nodes:
            if n not in state:
                visit(n)
        indeg = {n: len(node.deps) for n, node in self.nodes.items()}
        users: dict[str, list[str]] = {n: [] for n in self.nodes}
        for n, node in self.nodes.items():
            for d in node.deps:
                users[d].append(n)
        heap = [(node.index, n) for n, node in self.nodes.items() if indeg[n] == 0]
        heapq.heapify(heap)
        order = []
        while heap:
            _, n = heapq.heappop(heap)
            order.append(n)
            for u in users[n]:
                indeg[u] -= 1
                if indeg[u] == 0:
                    heapq.heappush(heap, (self.nodes[u].index, u))
        return order

    # ------------------------------------------------------------------ queries

    def ancestors(self, names: Sequence[str]) -> list[str]:
        """`names` and everything they depend on, in execution order."""
        want: set[str] = set()
        todo = list(names)
        while todo:
            n = todo.pop()
            if n in want:
                continue
            want.add(n)
            todo.extend(self.nodes[n].deps)
        return [n for n in self.order if n in want]

    def descendants(self, names: Sequence[str]) -> list[str]:
        want = set(names)
        for n in self.order:
            if any(d in want for d in self.nodes[n].deps):
                want.add(n)
        return [n for n in self.order if n in want]

    def base_dir(self, name: str, sub: KeyPath = ()) -> Path:
        """Directory that relative paths written at `sub` inside node `name` resolve against: that
        of the file that wrote the key (stages: the one writing its `type:`, so a shared parent
        recipe's stages keep pointing at the parent's files when extended from elsewhere)."""
        node = self.nodes.get(name)
        section = node.section if node is not None else "stages"
        if not sub:
            sub = ("type",) if section == "stages" else ()
        return self.loaded.base_dir((section, name, *sub))

    def stage_dir(self, name: str) -> Path:
        return self.base_dir(name)

    def check_names(self, names: Sequence[str], option: str) -> None:
        for n in names:
            if n not in self.nodes:
                raise ConfigError(f"{option} {n!r}: no such node in {self.file.name}"
                                  + suggest(n, self.nodes) + f"; nodes: {', '.join(self.order)}")

    def entry_fields(self) -> dict[str, list[str]]:
        return entry_fields()

    @property
    def roots(self) -> tuple[Path, ...]:
        """Directories the recipe may use without a grant: those of the recipe and of every file
        it extends, and the Hugging Face cache."""
        import os

        dirs = [self.recipe_dir, *(Path(p).parent for p in self.loaded.parents)]
        hf = os.environ.get("HF_HUB_CACHE") or (
            Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
        return tuple(dict.fromkeys([*(d.absolute() for d in dirs), Path(hf).absolute()]))

    def check_context(self, node: Node) -> CheckContext:
        return CheckContext(node.name, base_dir=lambda sub: self.base_dir(node.name, sub),
                            error=lambda msg, sub: self.error(msg, node.key_path + tuple(sub)),
                            node_names=frozenset(self.nodes), section=node.section, roots=self.roots)

    def requests(self) -> list[Request]:
        """Everything the recipe asks for that only the person running it can allow."""
        out: list[Request] = []
        if self.schema.workdir:
            cc = CheckContext("", base_dir=lambda sub: self.recipe_dir, error=self.error, roots=self.roots)
            if cc.outside(self.workdir):
                out.append(Request("path", str(self.workdir), f"workdir: writes every output to {self.workdir}, "
                                   "outside the recipe's directories", f"--allow-path {self.workdir}"))
        for node in self:
            out.extend(node.kind.requests(node.config, self.check_context(node)))
        return out

    def __iter__(self) -> Iterator[Node]:
        return (self.nodes[n] for n in self.order)


def entry_fields() -> dict[str, list[str]]:
    """The keys a `models:` / `datasets:` entry may have (for `--set` checks): every source kind's."""
    out: dict[str, list[str]] = {}
    for section in ("models", "datasets"):
        keys: dict[str, None] = {}
        for t in known_types(section):  # type: ignore[arg-type]
            keys.update(dict.fromkeys(get_kind(section, t).Config.model_fields))  # type: ignore[arg-type]
        out[section] = list(keys)
    return out
