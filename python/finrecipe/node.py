"""The node protocol: model sources, dataset sources and stage kinds are all `NodeKind`s.

A kind is one module with one class and one registration line:

    @register
    class MyStage(NodeKind[MyConfig]):
        type = "my_stage"        # the `type:` of a stage, or the source key (`path:`, `hub:`...)
        section = "stages"       # "models" | "datasets" | "stages"
        version = "1"            # part of every cache key of this kind: bump it when outputs change
        Config = MyConfig        # strict pydantic model of the node's body
        provides = "model"       # what downstream nodes receive: "model" | "dataset" | "none"

        def inputs(self, config): ...          # [(name, "model" | "dataset")] it refers to
        def run(self, config, inputs, out_dir, ctx) -> StageResult: ...

and, where the defaults do not fit: `cache_config` (what of the config goes into the key),
`resolve` (a key from content instead of config, e.g. a source's file hashes), `local_output`
(a source that needs no build), `output` (the reference downstream nodes get), `check`
(offline validation), `lock_entry`, `estimate_output_bytes`, `trusts_remote_code`.

Kinds are found through `get_kind(section, type)`: built-in kinds are imported lazily by the
module named in `BUILTIN`, and a team's package can add kinds through the entry-point group
`finrecipe.kinds` (`name = "package.module"`; importing the module registers its kinds).
Nothing above this module names a particular kind.
"""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel

from finrecipe.errors import ConfigError, RecipeError
from finrecipe.types import (
    DatasetRef,
    InputKind,
    InputRef,
    ModelRef,
    Provides,
    Request,
    StageContext,
    StageResult,
)
from finrecipe.util.content import ShaCache, digest
from finrecipe.util.plugins import import_entry_points

Section = Literal["models", "datasets", "stages"]
SECTIONS: tuple[Section, ...] = ("models", "datasets", "stages")
ConfigT = TypeVar("ConfigT", bound=BaseModel)
KeyPath = tuple["str | int", ...]


@dataclass
class Resolution:
    """What resolving one node gives: its cache key, the material the key is the digest of, and,
    for a source that needs no build, its output reference."""

    key: str
    material: dict[str, Any]
    local_output: InputRef | None = None  # set: nothing to build (a local directory, local files)
    lock_entry: dict[str, Any] | None = None
    size: int | None = None  # bytes of a local source
    # facts for `run` that are not part of the key (e.g. absolute paths); given as ctx.facts
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResolveContext:
    """What a kind may use to resolve a node: where its keys are written, the file-hash cache, the
    lockfile, and the resolutions of its inputs."""

    node: str
    section: Section
    workdir: Path
    shas: ShaCache
    lock: Mapping[str, Any] | None
    refresh: bool
    inputs: Mapping[str, Resolution]
    # base_dir(key path below the node) → directory relative paths written there resolve against
    base_dir: Callable[[KeyPath], Path]
    # error(message, key path below the node) → a RecipeError pointing at file:line:col
    error: Callable[[str, KeyPath], RecipeError]
    recipe_dir: Path = field(default_factory=Path.cwd)
    # names of the recipe's nodes (a reference may name one, e.g. a tokenizer source)
    node_names: frozenset[str] = frozenset()

    def locked(self, **match: Any) -> dict[str, Any] | None:
        """This node's lockfile entry when every `match` item equals the locked one."""
        if not self.lock:
            return None
        e = (self.lock.get(self.section) or {}).get(self.node)
        if not isinstance(e, dict) or any(e.get(k) != v for k, v in match.items()):
            return None
        return e


class NodeKind(Generic[ConfigT]):
    """Base of every node kind (sources and stages). Subclass, set the class attributes, override
    what differs from the defaults."""

    type: ClassVar[str]
    section: ClassVar[Section] = "stages"
    version: ClassVar[str] = "1"
    Config: ClassVar[builtins.type[BaseModel]]
    provides: ClassVar[Provides] = "model"
    # Whether resolving or running reaches the network (hub sources): `plan` may then leave the node
    # unresolved offline instead of failing.
    network: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pm = cls.__dict__.get("produces_model")  # `produces_model = False` means `provides = "none"`
        if isinstance(pm, bool) and "provides" not in cls.__dict__:
            cls.provides = "model" if pm else "none"

    # ---------------------------------------------------------------- graph
    def claims(self, entry: Mapping[str, Any]) -> bool:
        """Sources: whether a `models:`/`datasets:` entry is of this kind (default: it has the key
        named like the kind, e.g. `path:`). Exactly one kind of a section must claim an entry."""
        return self.type in entry

    def inputs(self, config: ConfigT) -> Sequence[tuple[str, InputKind]]:
        """Names of other nodes this node reads, each with the kind it expects."""
        return ()

    def optional_inputs(self, config: ConfigT) -> Sequence[tuple[str, InputKind]]:
        """Names that are inputs only when the recipe has a node of that name (e.g. an `init:`
        tokenizer that is either a directory or another model of the recipe)."""
        return ()

    @property
    def produces_model(self) -> bool:
        return self.provides == "model"

    # ---------------------------------------------------------------- cache key
    def cache_config(self, config: ConfigT) -> Any:
        """The JSON-able part of the config that determines the output (default: all of it).
        Leave out settings that cannot change the output (threads, logging intervals)."""
        return config.model_dump(mode="json")

    def resolve(self, config: ConfigT, rc: ResolveContext) -> Resolution:
        """The node's cache key. Default (stages): type, version, cache_config and input keys."""
        material = {"type": self.type, "version": str(self.version), "config": self.cache_config(config),
                    "inputs": {d: rc.inputs[d].key for d in sorted(rc.inputs)}}
        return Resolution(digest(material), material)

    def lock_entry(self, config: ConfigT, res: Resolution, result: StageResult | None
                   ) -> dict[str, Any] | None:
        """What the lockfile records for this node (sources); None for stages."""
        return res.lock_entry

    # ---------------------------------------------------------------- validate, plan
    def check(self, config: ConfigT, inputs: Mapping[str, InputRef], cc: CheckContext | None = None
              ) -> str | None:
        """Offline checks (`finrecipe validate`): local paths exist, configs agree with the inputs
        that exist locally (`inputs` holds only those). Raise a finrecipe error when something is
        wrong; return a note of what was checked, or None."""
        return None

    def offline_output(self, name: str, config: ConfigT, cc: CheckContext) -> InputRef | None:
        """For `validate`: the output of a source that needs no build, found without hashing or
        network (so that stages can be checked against it); None otherwise."""
        return None

    def requests(self, config: ConfigT, cc: CheckContext) -> Sequence[Request]:
        """What this node asks for that a recipe alone cannot allow (running a model directory's
        code, a network host, paths outside the recipe's directories); `apply` runs nothing until
        the user grants every request, and `plan` lists them."""
        return ()

    def estimate_output_bytes(self, config: ConfigT, inputs: Mapping[str, InputRef]) -> int | None:
        """Best-effort size of the output, for `finrecipe plan`; None when unknown."""
        return None

    def node_rank(self, config: ConfigT) -> int | None:
        """For a node that runs on every machine of a multi-node job (a training stage launched
        with `nnodes > 1`): this machine's rank in the job; None for a node that runs once. An
        `apply` on a machine of rank > 0 runs only such nodes, waits for their inputs to be built
        by rank 0, and leaves markers, records and the report to rank 0 (shared storage)."""
        return None

    def trusts_remote_code(self, config: ConfigT) -> bool | None:
        """Whether models this node provides need the model directory's own code to load;
        None (the default for stages): inherited from the node's model inputs."""
        return None

    # ---------------------------------------------------------------- build
    def run(self, config: ConfigT, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def output(self, name: str, config: ConfigT, out_dir: Path, result: StageResult,
               trust_remote_code: bool) -> InputRef | None:
        """The reference downstream nodes receive, from a finished node's result."""
        if self.provides == "model" and result.model_dir is not None:
            return ModelRef(name, Path(result.model_dir), trust_remote_code=trust_remote_code)
        return None


@dataclass
class CheckContext:
    """What `check` may use: where keys are written (for paths and errors)."""

    node: str
    base_dir: Callable[[KeyPath], Path]
    error: Callable[[str, KeyPath], RecipeError]
    node_names: frozenset[str] = frozenset()
    section: str = "stages"
    # The directories a recipe may read from without a grant: those of the recipe file and of the
    # files it extends, and the Hugging Face cache.
    roots: tuple[Path, ...] = ()

    def is_node(self, name: str) -> bool:
        return name in self.node_names

    def outside(self, path: Path) -> bool:
        """Whether `path` lies outside every root (links resolved)."""
        rp = Path(path).resolve()
        for root in self.roots:
            try:
                rp.relative_to(root.resolve())
                return False
            except ValueError:
                continue
        return True

    def path_request(self, path: Path, sub: KeyPath, verb: str = "reads") -> list[Request]:
        """A request to use `path` when it lies outside the recipe's directories."""
        if not self.outside(path):
            return []
        where = ".".join([self.section, self.node, *map(str, sub)])
        return [Request("path", str(Path(path).absolute()), f"{where} {verb} {path}, outside the recipe's "
                        "directories", f"--allow-path {Path(path).absolute()}")]


# ------------------------------------------------------------------------------------ registry

REGISTRY: dict[tuple[Section, str], NodeKind[Any]] = {}

# Built-in kinds: (section, type) → the module that registers it (imported on first use, so that
# torch is imported only when a kind that needs it runs). One line per kind.
BUILTIN: dict[tuple[Section, str], str] = {
    ("models", "path"): "finrecipe.sources.model_path",
    ("models", "hub"): "finrecipe.sources.model_hub",
    ("models", "init"): "finrecipe.sources.model_init",
    ("datasets", "files"): "finrecipe.sources.dataset_files",
    ("datasets", "hub"): "finrecipe.sources.dataset_hub",
    ("stages", "merge"): "finrecipe.stages.merge",
    ("stages", "continual_pretraining"): "finrecipe.stages.continual_pretraining",
    ("stages", "finetune"): "finrecipe.stages.finetune",
    ("stages", "evaluate"): "finrecipe.stages.evaluate",
    ("stages", "merge_search"): "finrecipe.stages.merge_search",
}

ENTRY_POINT_GROUP = "finrecipe.kinds"
K = TypeVar("K", bound=builtins.type[NodeKind[Any]])


def register(cls: K) -> K:
    """Class decorator: make a kind available under (cls.section, cls.type)."""
    REGISTRY[(cls.section, cls.type)] = cls()
    return cls


def _load_entry_points() -> None:
    import_entry_points(ENTRY_POINT_GROUP, "kind")


def known_types(section: Section) -> list[str]:
    """Every type available in `section` (built-in, registered and plug-ins), sorted."""
    _load_entry_points()
    return sorted({t for s, t in BUILTIN if s == section} | {t for s, t in REGISTRY if s == section})


def get_kind(section: Section, type_name: str) -> NodeKind[Any]:
    """The kind for `type_name` in `section`, importing its module on first use."""
    key = (section, type_name)
    if key not in REGISTRY and key in BUILTIN:
        modname = BUILTIN[key]
        try:
            importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            raise ConfigError(f"{section} kind {type_name!r} is reserved but not available in this "
                              "version of finrecipe") from None
    if key not in REGISTRY:
        _load_entry_points()
    if key not in REGISTRY:
        raise ConfigError(f"unknown {section[:-1]} type {type_name!r}; known: "
                          + ", ".join(known_types(section)))
    return REGISTRY[key]


__all__ = ["BUILTIN", "REGISTRY", "SECTIONS", "CheckContext", "ConfigT", "DatasetRef", "InputKind", "InputRef",
           "ModelRef", "NodeKind", "Request", "Resolution", "ResolveContext", "Section", "StageContext",
           "StageResult", "get_kind", "known_types", "register"]
