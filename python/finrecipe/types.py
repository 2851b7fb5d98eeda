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


@dataclass(frozen=True)
class Request:
    """Something a recipe asks for that a recipe alone cannot allow: running code from a model
    directory, reaching a network host, reading or writing outside the recipe's directories. It
    takes effect only when the person running `apply` grants it (`Grants`)."""

    kind: Literal["remote_code", "host", "path"]
    what: str  # the source's name, the host, the path
    why: str  # "models.x: trust_remote_code: true"
    option: str  # how to grant it: "--allow-remote-code x"

    def describe(self) -> str:
        return f"{self.why} (grant with {self.option})"


@dataclass(frozen=True)
class Grants:
    """What the person running a command allows (command-line options, or their own environment:
    FINRECIPE_ALLOW_REMOTE_CODE, FINRECIPE_ALLOW_HOSTS — comma-separated — and
    FINRECIPE_ALLOW_PATHS, os.pathsep-separated). `judge_key_env` names the environment variable a
    judge's API key is read from: the user's choice, never the recipe's."""

    remote_code: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    paths: tuple[Path, ...] = ()
    judge_key_env: str | None = None

    @classmethod
    def from_env(cls, *, remote_code: tuple[str, ...] | list[str] = (), hosts: tuple[str, ...] | list[str] = (),
                 paths: tuple[str | Path, ...] | list[str | Path] = (), judge_key_env: str | None = None,
                 environ: Mapping[str, str] | None = None) -> Grants:
        import os

        env = os.environ if environ is None else environ

        def split(v: str | None, sep: str) -> list[str]:
            return [x.strip() for x in (v or "").split(sep) if x.strip()]

        return cls(frozenset([*remote_code, *split(env.get("FINRECIPE_ALLOW_REMOTE_CODE"), ",")]),
                   frozenset(h.lower() for h in [*hosts, *split(env.get("FINRECIPE_ALLOW_HOSTS"), ",")]),
                   tuple(Path(p).expanduser().absolute()
                         for p in [*paths, *split(env.get("FINRECIPE_ALLOW_PATHS"), os.pathsep)]),
                   judge_key_env or env.get("FINRECIPE_JUDGE_KEY_ENV") or None)

    def allows(self, r: Request) -> bool:
        if r.kind == "remote_code":
            return r.what in self.remote_code or "*" in self.remote_code
        if r.kind == "host":
            return r.what.lower() in self.hosts
        return any(_within(Path(r.what), root) for root in self.paths)


def _within(p: Path, root: Path) -> bool:
    try:
        Path(p).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


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
    # What the person running the command allowed (see `Grants`).
    grants: Grants = field(default_factory=Grants)


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


__all__ = ["DatasetFormat", "DatasetRef", "Grants", "InputKind", "InputRef", "ModelRef", "Provides", "Request",
           "StageContext", "StageResult"]
