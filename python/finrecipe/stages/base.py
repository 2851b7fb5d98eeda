"""The contract between the recipe engine and the stage kinds.

The engine knows nothing stage-specific. A stage kind is one module that defines:

- a pydantic v2 config model (strict: ``model_config = ConfigDict(extra="forbid")``) for the
  stage's fields in the recipe (everything but ``type``);
- ``version``: bump it whenever a change to the implementation changes outputs; it is part of the
  cache key of every node of that kind;
- ``inputs(config)``: the names the stage refers to, each with the kind it expects
  (``"model"`` or ``"dataset"``), so the engine can check references and build the DAG;
- ``run(config, inputs, out_dir, ctx) -> StageResult``.

Directory convention for a node with cache key K: ``<workdir>/<node>/<K>/`` is ``out_dir``.
A model-producing stage writes its Hugging Face model directory to ``out_dir / "model"``
(atomically: into a temporary sibling, then renamed), keeps resumable scratch state (training
checkpoints) under ``out_dir / "work"``, and returns ``StageResult(model_dir=out_dir / "model")``.
The engine writes the node's completion marker last; a node without it is not done, and its
``out_dir`` is handed to the next ``run`` as-is so that it can resume.

Stage kinds register themselves with ``@register``; the engine imports ``finrecipe.stages.<type>``
lazily by the ``type:`` string so that importing torch happens only when a stage really runs.
"""

from __future__ import annotations

import builtins
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel

from finrecipe.errors import ConfigError
from finrecipe.progress import NullProgress, Progress

InputKind = Literal["model", "dataset"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a local Hugging Face model directory (safetensors + config + tokenizer)."""

    name: str
    path: Path
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DatasetRef:
    """A resolved dataset: concrete files (sorted), their format and the text field to read."""

    name: str
    files: tuple[Path, ...]
    format: Literal["jsonl", "parquet", "text"]
    text_field: str = "text"
    weight: float = 1.0
    # sha256 per file (same order as `files`), filled in by the engine for cache keys and locks.
    sha256: tuple[str, ...] = ()


@dataclass
class StageContext:
    """What the engine gives a running stage besides its config and inputs."""

    node: str
    workdir: Path
    # A directory shared by all nodes of the recipe for derived, content-addressed data
    # (e.g. tokenized shards keyed by tokenizer + data hashes).
    cache_dir: Path
    progress: Progress = field(default_factory=NullProgress)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("finrecipe"))
    seed: int = 0
    # Outputs of all finished nodes so far, by node name (an evaluate stage reads metrics from here).
    results: Mapping[str, StageResult] = field(default_factory=dict)
    # Directory of the recipe file: relative paths inside stage configs resolve against it.
    recipe_dir: Path = field(default_factory=Path.cwd)


@dataclass
class StageResult:
    """What a stage produced. Must be JSON-serialisable (paths as strings are fine)."""

    model_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Named files the report may show (plots, tables, metric logs), relative to out_dir or absolute.
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "metrics": self.metrics,
            "artifacts": self.artifacts,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StageResult:
        md = d.get("model_dir")
        return cls(model_dir=Path(md) if md else None, metrics=dict(d.get("metrics", {})),
                   artifacts=dict(d.get("artifacts", {})))


class StageKind:
    """Base class of stage kinds. Subclass, set the class attributes, implement the methods."""

    type: ClassVar[str]
    version: ClassVar[str]
    Config: ClassVar[builtins.type[BaseModel]]
    # Whether the stage produces a model usable where a model is expected.
    produces_model: ClassVar[bool] = True

    def inputs(self, config: BaseModel) -> Sequence[tuple[str, InputKind]]:
        raise NotImplementedError

    def run(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef],
            out_dir: Path, ctx: StageContext) -> StageResult:
        raise NotImplementedError

    def cache_config(self, config: BaseModel) -> Any:
        """The JSON-able part of the config that determines the output; it goes into the node's
        cache key. Default: the whole config. Leave out settings that cannot change the output
        (thread counts, logging intervals)."""
        return config.model_dump(mode="json")

    def check(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef]) -> None:
        """Cheap checks of the config against inputs that already exist locally (for
        `finrecipe validate`; e.g. a merge config against the models' headers). Raise a
        finrecipe error when something is wrong. `inputs` holds only the inputs available."""
        return None

    def estimate_output_bytes(self, config: BaseModel,
                              inputs: Mapping[str, ModelRef | DatasetRef]) -> int | None:
        """Best-effort size of the output, for `finrecipe plan`; None when unknown."""
        return None


REGISTRY: dict[str, StageKind] = {}

# Stage types the engine knows about, mapped to the module that implements each.
KNOWN_TYPES: dict[str, str] = {
    "merge": "finrecipe.stages.merge",
    "continual_pretraining": "finrecipe.stages.continual_pretraining",
    "finetune": "finrecipe.stages.finetune",
    "evaluate": "finrecipe.stages.evaluate",
}


def register(cls: type[StageKind]) -> type[StageKind]:
    REGISTRY[cls.type] = cls()
    return cls


def get_kind(type_name: str) -> StageKind:
    """The stage kind for a `type:` string, importing its module on first use."""
    if type_name not in REGISTRY:
        modname = KNOWN_TYPES.get(type_name)
        if modname is None:
            known = ", ".join(sorted(KNOWN_TYPES))
            raise ConfigError(f"unknown stage type {type_name!r}; known types: {known}")
        try:
            importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            raise ConfigError(
                f"stage type {type_name!r} is reserved but not available in this version of finrecipe"
            ) from None
    return REGISTRY[type_name]


ProgressCallback = Callable[[int, int], None]
