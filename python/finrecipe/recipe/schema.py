"""The recipe file schema (pydantic v2, strict: unknown keys are errors everywhere).

Stage bodies are kept as plain dicts here; each is validated by its stage kind's `Config` model
(see `finrecipe.stages.base`) once the stage's `type:` is known.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Node names: also directory names, and addressable with `--set stages.NAME.key=...` (no dots).
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
HEX40 = re.compile(r"^[0-9a-f]{40}$")

DatasetFormat = Literal["jsonl", "parquet", "text"]
FORMAT_BY_SUFFIX: dict[str, DatasetFormat] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InitSpec(_Strict):
    """A fresh random model built from a transformers config (tests, demos, toy runs)."""

    config: dict[str, Any] = Field(description="transformers config dict with model_type "
                                   "(or architectures) and sizes")
    seed: StrictInt = 0
    tokenizer: str | None = Field(default=None, description="a tokenizer directory, or the name "
                                  "of another model in this recipe")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("config")
    @classmethod
    def _has_type(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("model_type"), str) and not v.get("architectures"):
            raise ValueError("init.config needs 'model_type' (e.g. llama) or 'architectures'")
        return v


class ModelSource(_Strict):
    """Exactly one of `path` (local directory), `hub` (+ `revision`), `init`."""

    path: str | None = None
    hub: str | None = None
    revision: str | None = None
    init: InitSpec | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in ("path", "hub", "init") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a model needs exactly one of 'path', 'hub' or 'init'"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.revision is not None and self.hub is None:
            raise ValueError("'revision' is only meaningful with 'hub'")
        if self.allow_pickle and self.hub is None:
            raise ValueError("'allow_pickle' is only meaningful with 'hub'")
        if self.hub is not None and not re.match(r"^[\w.-]+(/[\w.-]+)?$", self.hub):
            raise ValueError(f"'hub' must look like 'org/name' (got {self.hub!r})")
        return self

    @property
    def kind(self) -> Literal["path", "hub", "init"]:
        return "path" if self.path is not None else ("hub" if self.hub is not None else "init")


class DatasetSpec(_Strict):
    """Local files by glob, or a hub dataset by id + revision (optionally restricted by `files`)."""

    files: str | list[str] | None = None
    hub: str | None = None
    revision: str | None = None
    format: DatasetFormat | None = None
    text_field: str = "text"
    weight: float = Field(default=1.0, gt=0)
    # what belongs here, for whoever fills it in: appended to the error when no file matches
    # (not part of the cache key or the lockfile)
    description: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if self.hub is None and self.files is None:
            raise ValueError("a dataset needs 'files' (glob patterns) or 'hub' (a dataset id)")
        if self.revision is not None and self.hub is None:
            raise ValueError("'revision' is only meaningful with 'hub'")
        return self

    @property
    def patterns(self) -> list[str]:
        if self.files is None:
            return []
        return [self.files] if isinstance(self.files, str) else list(self.files)


class RecipeSchema(_Strict):
    finrecipe: Literal[1] = Field(description="recipe schema version")
    name: str
    description: str = ""
    workdir: str | None = None
    extends: str | list[str] | None = None
    models: dict[str, ModelSource] = Field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("a recipe name may use letters, digits, '_', '.', '-' "
                             "(it names the default workdir)")
        return v


def infer_format(filename: str) -> DatasetFormat | None:
    lower = filename.lower()
    for suf, fmt in FORMAT_BY_SUFFIX.items():
        if lower.endswith(suf) or lower.endswith(suf + ".gz"):
            return fmt
    return None


# Top-level sections whose keys are user-chosen names.
NAMED_SECTIONS = ("models", "datasets", "stages")
