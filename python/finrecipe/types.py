"""Value types shared by every layer (the bottom of the package: imports nothing of finrecipe's
but `progress`).

- `ModelRef` / `DatasetRef`: a resolved input of a node (what a stage receives);
- `StageResult`: what a node produced (recorded in its completion marker);
- `StageContext`: what the engine hands a running node besides its config and inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finrecipe.progress import NullProgress, Progress

InputKind = Literal["model", "dataset"]
Provides = Literal["model", "dataset", "none"]
DatasetFormat = Literal["jsonl", "parquet", "text"]


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
    format: DatasetFormat
    text_field: str = "text"
    weight: float = 1.0
    # sha256 per file (same order as `files`), filled in by the engine for cache keys and locks.
    sha256: tuple[str, ...] = ()


InputRef = ModelRef | DatasetRef


@dataclass
class StageContext:
    """What the engine gives a running node besides its config and inputs."""

    node: str
    workdir: Path
    # A directory shared by all nodes of the recipe for derived, content-addressed data
    # (e.g. tokenized shards keyed by tokenizer + data hashes).
    cache_dir: Path
    progress: Progress = field(default_factory=NullProgress)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("finrecipe"))
    # Directory that relative paths inside the node's config resolve against (that of the file
    # that defines the node).
    recipe_dir: Path = field(default_factory=Path.cwd)
    # The node's resolved key material (e.g. the commit a hub revision resolved to).
    material: Mapping[str, Any] = field(default_factory=dict)
    # Facts found while resolving that are not part of the key (absolute paths, ...).
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """What a node produced. Must be JSON-serialisable (paths as strings are fine)."""

    model_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Named files the report may show (plots, tables, metric logs), relative to out_dir or absolute.
    artifacts: dict[str, str] = field(default_factory=dict)
    # Kind-specific facts the kind needs to rebuild its output reference from the marker later
    # (e.g. the files a hub dataset downloaded). Stored in the marker beside the result.
    extra: dict[str, Any] = field(default_factory=dict)

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


__all__ = ["DatasetFormat", "DatasetRef", "InputKind", "InputRef", "ModelRef", "Provides",
           "StageContext", "StageResult"]
