"""The recipe file schema (pydantic v2, strict: unknown keys are errors everywhere).

Model, dataset and stage bodies are kept as plain dicts here; each is validated by its node kind's
`Config` model (see `finrecipe.node`) once its kind is known.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finrecipe.sources.specs import (  # noqa: F401  (re-exported)
    FORMAT_BY_SUFFIX,
    DatasetSpec,
    InitSpec,
    ModelSource,
    infer_format,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Node names: also directory names, and addressable with `--set stages.NAME.key=...` (no dots).
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeSchema(_Strict):
    finrecipe: Literal[1] = Field(description="recipe schema version")
    name: str
    description: str = ""
    workdir: str | None = None
    extends: str | list[str] | None = None
    # Evaluation suites that may only be evaluated, never optimised on (by a merge search, a merge
    # probe or any other selection): an objective that names one is a validation error.
    protected: list[str] = Field(default_factory=lambda: ["jfin"])
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("a recipe name may use letters, digits, '_', '.', '-' "
                             "(it names the default workdir)")
        return v
