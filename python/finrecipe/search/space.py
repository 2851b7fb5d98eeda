"""The search space of a merge search and the candidates drawn from it.

A candidate is one merge of `base` with the instruct model and one domain model:

    {"method": "ties", "domain": "finance",
     "weights": {"instruct": 1.2, "finance": [0.6, 0.9]},   # a list: one weight per layer group
     "density": 0.5}                                          # methods with a density only

`Candidate.merge_config` turns it into the mergekit-style mapping that `finrecipe.merge` validates
and runs (a layer-group list becomes a mergekit gradient, interpolated over layer index by the
planner), so a candidate means exactly what the same `type: merge` stage would produce.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from finrecipe.util.content import digest

# Methods a search may use: those of the merge table that combine task vectors with a weight per
# model (and optionally a density). slerp/model_stock/linear/passthrough have no per-model weight.
SEARCHABLE = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
ROUND = 4  # decimals of sampled values (readable configs, stable cache keys)


def method_has_density(method: str) -> bool:
    from finrecipe.merge import METHODS

    return METHODS[method].param("density") is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSpace(_Strict):
    """`space:` of a merge_search stage."""

    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic"], min_length=1)
    # model name → [low, high] (inclusive); models not named get `default_weight`
    weights: dict[str, tuple[float, float]] = Field(default_factory=dict)
    default_weight: tuple[float, float] = (0.5, 1.5)
    density: tuple[float, float] = (0.3, 1.0)
    # >1: each model's weight is a gradient over this many layer groups (first layers .. last)
    layer_groups: int = Field(default=1, ge=1, le=8)
    # grid strategy: evenly spaced values per weight (and density) dimension
    grid_points: int = Field(default=3, ge=1, le=11)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from finrecipe.merge import METHODS

        for m in v:
            if m not in METHODS:
                raise ValueError(f"unknown merge method {m!r}; known: {', '.join(METHODS)}")
            if m not in SEARCHABLE:
                raise ValueError(f"merge method {m!r} has no per-model weight to search; searchable: "
                                 + ", ".join(SEARCHABLE))
        if len(set(v)) != len(v):
            raise ValueError("methods are listed twice")
        return v

    @field_validator("weights")
    @classmethod
    def _ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for k, (lo, hi) in v.items():
            if lo > hi:
                raise ValueError(f"weights.{k}: [low, high] needs low <= high, got [{lo}, {hi}]")
        return v

    @model_validator(mode="after")
    def _density(self) -> SearchSpace:
        lo, hi = self.density
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"density: [low, high] must satisfy 0 < low <= high <= 1, got [{lo}, {hi}]")
        lo, hi = self.default_weight
        if lo > hi:
            raise ValueError(f"default_weight: [low, high] needs low <= high, got [{lo}, {hi}]")
        return self

    def weight_range(self, model: str) -> tuple[float, float]:
        return tuple(self.weights.get(model, self.default_weight))  # type: ignore[return-value]


@dataclass(frozen=True)
class Candidate:
    """One merge to try (see the module docstring)."""

    method: str
    domain: str
    weights: Mapping[str, float | tuple[float, ...]]
    density: float | None = None
    label: str = ""  # "fixed" for the reference 1.0/1.0 merge; empty for search candidates
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        w = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.weights.items()}
        d: dict[str, Any] = {"method": self.method, "domain": self.domain, "weights": w}
        if self.density is not None:
            d["density"] = self.density
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], label: str = "") -> Candidate:
        w = {k: (tuple(v) if isinstance(v, list) else float(v)) for k, v in d["weights"].items()}
        return cls(d["method"], d["domain"], w, d.get("density"), label)

    @property
    def key(self) -> str:
        return digest(self.to_json())[:16]

    def describe(self) -> str:
        def f(v: float | tuple[float, ...]) -> str:
            return "/".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"

        parts = [f"{k} {f(v)}" for k, v in self.weights.items()]
        if self.density is not None:
            parts.append(f"density {self.density:g}")
        return f"{self.method} ({', '.join(parts)})"

    def merge_config(self, base: str, *, dtype: str = "float32", out_dtype: str | None = None) -> dict[str, Any]:
        """The mergekit-style mapping of this candidate (models named as in the recipe)."""
        models = []
        for name, w in self.weights.items():
            params: dict[str, Any] = {"weight": list(w) if isinstance(w, tuple) else w}
            if self.density is not None:
                params["density"] = self.density
            models.append({"model": name, "parameters": params})
        cfg: dict[str, Any] = {"merge_method": self.method, "base_model": base, "models": models, "dtype": dtype}
        if out_dtype is not None:
            cfg["out_dtype"] = out_dtype
        return cfg


def fixed_candidate(instruct: str, domain: str) -> Candidate:
    """The paper's merge: task arithmetic with weight 1.0 for both vectors."""
    return Candidate("task_arithmetic", domain, {instruct: 1.0, domain: 1.0}, None, "fixed")


def _points(lo: float, hi: float, n: int) -> list[float]:
    if n == 1 or lo == hi:
        return [round((lo + hi) / 2, ROUND)] if lo != hi else [round(lo, ROUND)]
    return [round(lo + (hi - lo) * i / (n - 1), ROUND) for i in range(n)]


def _weight(vals: Sequence[float]) -> float | tuple[float, ...]:
    return float(vals[0]) if len(vals) == 1 else tuple(float(x) for x in vals)


def grid(space: SearchSpace, instruct: str, domains: Sequence[str]) -> Iterator[Candidate]:
    """Every grid point, in a fixed order: method, domain, weights (instruct first), density."""
    g = space.layer_groups
    for method in space.methods:
        dens = _points(*space.density, space.grid_points) if method_has_density(method) else [None]
        for dom in domains:
            models = [instruct, dom]
            axes = [_points(*space.weight_range(m), space.grid_points) for m in models for _ in range(g)]
            for combo in itertools.product(*axes):
                w = {m: _weight(combo[i * g:(i + 1) * g]) for i, m in enumerate(models)}
                for d in dens:
                    yield Candidate(method, dom, w, d)


def grid_size(space: SearchSpace, instruct: str, domains: Sequence[str]) -> int:
    """How many candidates `grid` yields (without building them)."""
    total = 0
    for method in space.methods:
        n = len(_points(*space.density, space.grid_points)) if method_has_density(method) else 1
        for dom in domains:
            per = n
            for m in (instruct, dom):
                per *= len(_points(*space.weight_range(m), space.grid_points)) ** space.layer_groups
            total += per
    return total


def random_candidate(space: SearchSpace, instruct: str, domains: Sequence[str], rng: random.Random) -> Candidate:
    """One uniform draw (deterministic given `rng`'s state)."""
    method = rng.choice(list(space.methods))
    dom = rng.choice(list(domains))
    w: dict[str, float | tuple[float, ...]] = {}
    for m in (instruct, dom):
        lo, hi = space.weight_range(m)
        w[m] = _weight([round(rng.uniform(lo, hi), ROUND) for _ in range(space.layer_groups)])
    d = round(rng.uniform(*space.density), ROUND) if method_has_density(method) else None
    return Candidate(method, dom, w, d)


__all__ = ["ROUND", "SEARCHABLE", "Candidate", "SearchSpace", "fixed_candidate", "grid", "grid_size",
           "method_has_density", "random_candidate"]
