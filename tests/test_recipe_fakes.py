"""Fake stage kinds for the recipe-engine tests (no tests here; imported by tests/test_recipe*.py and
by the subprocesses those tests start, with tests/ on PYTHONPATH).

`fake_concat` "merges" its input models by combining their `weights.txt` with its `value`; it logs
every run to `count_file` (to prove what ran) and can sleep in steps, resuming from
`out_dir/work/steps` (to test interruption). `fake_eval` produces metrics and no model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from finrecipe.stages.base import (
    DatasetRef,
    InputKind,
    ModelRef,
    StageContext,
    StageKind,
    StageResult,
    register,
)
from finrecipe.util.fs import atomic_dir


class ConcatConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str]
    datasets: list[str] = []
    value: float = 1.0
    steps: int = 0  # number of sleep steps
    step_seconds: float = 0.0
    count_file: str | None = None  # not part of the output: excluded from the cache key
    fail: bool = False  # raise after the sleep steps


def _log_run(count_file: str | None, line: str) -> None:
    if count_file:
        with open(count_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@register
class FakeConcat(StageKind[ConcatConfig]):
    type = "fake_concat"
    version = "1"
    Config = ConcatConfig

    def inputs(self, config: ConcatConfig) -> Sequence[tuple[str, InputKind]]:
        return [(m, "model") for m in config.models] + [(d, "dataset") for d in config.datasets]

    def cache_config(self, config: ConcatConfig) -> object:
        return config.model_dump(mode="json", exclude={"count_file"})

    def run(self, config: ConcatConfig, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        work = out_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        done = int((work / "steps").read_text()) if (work / "steps").exists() else 0
        _log_run(config.count_file, f"start {ctx.node} {done}")
        for i in range(done, config.steps):
            time.sleep(config.step_seconds)
            (work / "steps").write_text(str(i + 1))
        if config.fail:
            raise RuntimeError("fake failure")
        parts = []
        for m in config.models:
            ref = inputs[m]
            assert isinstance(ref, ModelRef)
            parts.append((ref.path / "weights.txt").read_text())
        for d in config.datasets:
            ref_d = inputs[d]
            assert isinstance(ref_d, DatasetRef)
            parts.extend(ref_d.sha256)
        content = hashlib.sha256(json.dumps([parts, config.value]).encode()).hexdigest()
        with atomic_dir(out_dir / "model", overwrite=True) as tmp:
            (tmp / "weights.txt").write_text(content)
            (tmp / "config.json").write_text("{}")
        _log_run(config.count_file, f"done {ctx.node}")
        trust = any(isinstance(r, ModelRef) and r.trust_remote_code for r in inputs.values())
        return StageResult(model_dir=out_dir / "model", metrics={"value": config.value, "trust": trust,
                                                                "recipe_dir": str(ctx.recipe_dir)})


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    count_file: str | None = None


@register
class FakeEval(StageKind[EvalConfig]):
    type = "fake_eval"
    version = "1"
    Config = EvalConfig
    provides = "none"

    def inputs(self, config: EvalConfig) -> Sequence[tuple[str, InputKind]]:
        return [(config.model, "model")]

    def cache_config(self, config: EvalConfig) -> object:
        return config.model_dump(mode="json", exclude={"count_file"})

    def run(self, config: EvalConfig, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        ref = inputs[config.model]
        assert isinstance(ref, ModelRef)
        _log_run(config.count_file, f"done {ctx.node}")
        w = (ref.path / "weights.txt").read_text()
        return StageResult(metrics={"score": int(w[:4], 16) / 65535})


class DistConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[str]
    nnodes: int = 1
    count_file: str | None = None


@register
class FakeDist(StageKind[DistConfig]):
    """A stage that runs on every machine of a multi-node job (like training with launch.nnodes > 1)."""

    type = "fake_dist"
    version = "1"
    Config = DistConfig

    def inputs(self, config: DistConfig) -> Sequence[tuple[str, InputKind]]:
        return [(m, "model") for m in config.models]

    def cache_config(self, config: DistConfig) -> object:
        return config.model_dump(mode="json", exclude={"count_file"})

    def node_rank(self, config: DistConfig) -> int | None:
        import os

        return int(os.environ.get("FINRECIPE_NODE_RANK", "0")) if config.nnodes > 1 else None

    def run(self, config: DistConfig, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        rank = self.node_rank(config) or 0
        _log_run(config.count_file, f"{ctx.node} rank {rank}")
        if rank:
            return StageResult()  # a worker: rank 0 writes the model
        with atomic_dir(out_dir / "model", overwrite=True) as tmp:
            (tmp / "weights.txt").write_text("dist")
        return StageResult(model_dir=out_dir / "model")
