"""A validated recipe: schema, stage configs, references, the DAG and its execution order."""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from finrecipe.errors import ConfigError, RecipeError
from finrecipe.progress import NullProgress, Progress
from finrecipe.recipe.loader import Loaded, apply_override, read_recipe
from finrecipe.recipe.schema import NODE_NAME_RE, DatasetSpec, ModelSource, RecipeSchema
from finrecipe.stages.base import KNOWN_TYPES, REGISTRY, StageKind, get_kind
from finrecipe.yamlio import KeyPath, format_path, suggest, validation_error

if TYPE_CHECKING:
    from finrecipe.recipe.engine import ApplyResult, Plan

Section = Literal["models", "datasets", "stages"]
_SECTION_KIND = {"models": "model", "datasets": "dataset", "stages": "stage"}


@dataclass
class Node:
    """One node of the recipe DAG: a model source, a dataset or a stage."""

    name: str
    section: Section
    type: str  # "model" | "dataset" | the stage type
    index: int  # declaration order (ties in the execution order are broken by it)
    deps: list[str] = field(default_factory=list)
    dep_paths: dict[str, KeyPath] = field(default_factory=dict)  # where each reference is written
    model: ModelSource | None = None
    dataset: DatasetSpec | None = None
    kind: StageKind | None = None
    config: BaseModel | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def provides(self) -> Literal["model", "dataset", "none"]:
        if self.section == "models":
            return "model"
        if self.section == "datasets":
            return "dataset"
        assert self.kind is not None
        return "model" if self.kind.produces_model else "none"


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


class Recipe:
    """A loaded, validated recipe. Build one with `finrecipe.load_recipe(path, overrides=[...])`."""

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

    def _err(self, message: str, path: KeyPath) -> RecipeError:
        return RecipeError(message, **self.loaded.where(path))

    def _build_nodes(self) -> None:
        idx = 0
        seen: dict[str, str] = {}
        for section in ("models", "datasets", "stages"):
            entries: dict[str, Any] = getattr(self.schema, section)
            for name in entries:
                kp: KeyPath = (section, name)
                if not isinstance(name, str) or not NODE_NAME_RE.match(name):
                    raise self._err(f"bad name {name!r}: use letters, digits, '_' and '-' (names become "
                                    "directory names and --set paths)", kp)
                if name in seen:
                    raise self._err(f"name {name!r} is already used by {seen[name]}.{name}; model, dataset "
                                    "and stage names share one namespace", kp)
                seen[name] = section
                if section == "models":
                    node = Node(name, "models", "model", idx, model=entries[name])
                elif section == "datasets":
                    node = Node(name, "datasets", "dataset", idx, dataset=entries[name])
                else:
                    node = self._stage_node(name, entries[name], idx)
                self.nodes[name] = node
                idx += 1

    def _stage_node(self, name: str, body: dict[str, Any], idx: int) -> Node:
        kp: KeyPath = ("stages", name)
        if not isinstance(body, dict):
            raise self._err("a stage must be a mapping with a 'type' key", kp)
        body = dict(body)
        typ = body.pop("type", None)
        if typ is None:
            raise self._err(f"required key 'type' missing (one of: {', '.join(sorted(KNOWN_TYPES))})", kp)
        if not isinstance(typ, str):
            raise self._err(f"'type' must be a string (got {typ!r})", kp + ("type",))
        try:
            kind = get_kind(typ)
        except ConfigError as e:
            if typ not in KNOWN_TYPES and typ not in REGISTRY:
                raise self._err(f"unknown stage type {typ!r}" + suggest(typ, [*KNOWN_TYPES, *REGISTRY])
                                + f"; known types: {', '.join(sorted(KNOWN_TYPES))}", kp + ("type",)) from None
            raise self._err(str(e), kp + ("type",)) from None
        ctx = {"file": str(self.file), "positions": self.loaded.lines, "files": self.loaded.files,
               "prefix": kp, "recipe_dir": self.stage_dir(name)}
        try:
            config = kind.Config.model_validate(body, context=ctx)  # type: ignore[attr-defined]
        except ValidationError as e:
            raise validation_error(e, file=str(self.file), positions=self.loaded.lines,
                                   files=self.loaded.files, prefix=kp, model=kind.Config) from None
        except RecipeError as e:
            raise self._relocate(e) from None
        return Node(name, "stages", typ, idx, kind=kind, config=config, raw=body)

    def _relocate(self, e: RecipeError) -> RecipeError:
        """Point an error raised with a single file at the file that really wrote the key."""
        if not e.path:
            return e
        for kp in self.loaded.lines:
            if format_path(kp) == e.path:
                return RecipeError(e.message, **self.loaded.where(kp))
        return e

    def _check_refs(self) -> None:
        for node in self.nodes.values():
            refs: list[tuple[str, str, KeyPath]] = []
            if node.model is not None and node.model.init is not None and node.model.init.tokenizer:
                tok = node.model.init.tokenizer
                if tok in self.nodes:
                    refs.append((tok, "model", ("models", node.name, "init", "tokenizer")))
            if node.kind is not None:
                assert node.config is not None
                for in_name, in_kind in node.kind.inputs(node.config):
                    where = _find_value(node.raw, in_name, ("stages", node.name)) or ("stages", node.name)
                    refs.append((in_name, str(in_kind), where))
            for ref, expected, where in refs:
                target = self.nodes.get(ref)
                if target is None:
                    pool = [n.name for n in self.nodes.values()
                            if (n.provides == expected) and n.name != node.name]
                    raise self._err(f"unknown {expected} {ref!r}" + suggest(ref, pool)
                                    + (f"; {expected}s in this recipe: {', '.join(pool)}" if pool else ""),
                                    where)
                if target.provides != expected:
                    what = {"model": "a model", "dataset": "a dataset", "none": "a stage with no model output"}
                    raise self._err(f"{ref!r} is {what[target.provides]} ({target.section}.{ref}), but "
                                    f"{what[expected]} is expected here", where)
                if ref == node.name:
                    raise self._err(f"stage {ref!r} refers to itself", where)
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
                    raise self._err("dependency cycle: " + " -> ".join(cyc) + "; a stage cannot use "
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

    def stage_dir(self, name: str) -> Path:
        """Directory that relative paths inside stage `name` resolve against: that of the file
        defining the stage (the one writing its `type:`), so a shared parent recipe's stages keep
        pointing at the parent's files when extended from elsewhere."""
        return self.loaded.base_dir(("stages", name, "type"))

    def check_names(self, names: Sequence[str], option: str) -> None:
        for n in names:
            if n not in self.nodes:
                raise ConfigError(f"{option} {n!r}: no such node in {self.file.name}"
                                  + suggest(n, self.nodes) + f"; nodes: {', '.join(self.order)}")

    def __iter__(self) -> Iterator[Node]:
        return (self.nodes[n] for n in self.order)

    # ------------------------------------------------------------------ operations

    def validate(self) -> list[str]:
        """Checks beyond the schema that need no heavy work: local paths exist, merge configs
        against the headers of local input models. Returns notes (what was checked)."""
        from finrecipe.recipe.engine import validate_deep

        return validate_deep(self)

    def plan(self, *, progress: Progress | None = None) -> Plan:
        from finrecipe.recipe.engine import make_plan

        return make_plan(self, progress=progress or NullProgress())

    def apply(self, *, only: Sequence[str] | None = None, force: Sequence[str] | None = None,
              dry_run: bool = False, locked: bool = False, progress: Progress | None = None,
              write_lock: bool = True) -> ApplyResult:
        """Run every node that is not cached. The lockfile (`self.lock_path`) is read for pinned hub
        commits and for `locked`; it is rewritten when something resolves differently, unless
        `write_lock` is false."""
        from finrecipe.recipe.engine import apply

        return apply(self, only=list(only or []), force=list(force or []), dry_run=dry_run,
                     locked=locked, progress=progress or NullProgress(), write_lock=write_lock)

    def lock(self, *, refresh: bool = True) -> Path:
        """Resolve everything (hub commits, dataset hashes) and write RECIPE.lock."""
        from finrecipe.recipe.engine import write_lock

        return write_lock(self, refresh=refresh)


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *,
                lock_file: str | Path | None = None) -> Recipe:
    """Read, merge (`extends`), override (`--set`) and validate a recipe file.

    `lock_file`: where the lockfile is read and written (default `<recipe>.lock` beside the recipe).
    """
    loaded = read_recipe(path)
    top = dict(RecipeSchema.model_fields)
    entry_fields = {"models": list(ModelSource.model_fields), "datasets": list(DatasetSpec.model_fields)}
    for expr in overrides:
        apply_override(loaded, expr, top_fields=top, entry_fields=entry_fields)
    recipe = Recipe(loaded)
    if lock_file is not None:
        recipe.lock_path = Path(lock_file).absolute()
    return recipe
