"""The built-in source specs: what a `models:` or `datasets:` entry of a recipe may say."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from finrecipe.types import DatasetFormat

FORMAT_BY_SUFFIX: dict[str, DatasetFormat] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".text": "text",
}


def infer_format(filename: str) -> DatasetFormat | None:
    lower = filename.lower()
    for suf, fmt in FORMAT_BY_SUFFIX.items():
        if lower.endswith(suf) or lower.endswith(suf + ".gz"):
            return fmt
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
        if self.allow_pickle and self.init is not None:
            raise ValueError("'allow_pickle' is only meaningful with 'hub' or 'path'")
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


__all__ = ["FORMAT_BY_SUFFIX", "DatasetFormat", "DatasetSpec", "InitSpec", "ModelSource", "infer_format"]
