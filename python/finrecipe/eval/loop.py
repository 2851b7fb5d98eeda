"""The one evaluation loop, shared by the `evaluate` stage and `finrecipe eval`: for each model, load
it once, run every task entry's suite on it, and collect typed results.

    run = evaluate_models(models, specs, out_dir=..., progress=...)
    run.metrics(reference="base")   # EvalMetrics: the stage's metrics (schema finrecipe.evaluate/1)
    run.detail                      # model → suite name → the suite's detailed results (results.json)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.eval.lm import LM
from finrecipe.eval.results import EvalMetrics, ModelScores, TaskResult
from finrecipe.eval.suite import Suite, SuiteContext, SuiteSpec, Summary, suite_of_spec
from finrecipe.progress import NullProgress, Progress
from finrecipe.types import DatasetRef, Grants, ModelRef


@dataclass
class EntryRun:
    """One task entry run on one model."""

    spec: SuiteSpec
    suite: Suite[Any]
    results: list[TaskResult]
    summary: Summary


@dataclass
class EvalRun:
    """Everything one evaluation produced."""

    task_order: list[str]
    runs: dict[str, list[EntryRun]]  # model → its entries, in spec order
    artifacts: dict[str, str] = field(default_factory=dict)

    def scores(self, model: str) -> ModelScores:
        s = ModelScores()
        for er in self.runs[model]:
            for r in er.summary.tasks:
                s.tasks[r.task] = r
            if er.summary.has_leaderboard:
                s.average = er.summary.average
                s.average_complete = er.summary.average_complete
                s.best_version = er.summary.best_version
                s.jfin_versions = dict(er.summary.by_version or {})
        return s

    def metrics(self, reference: str | None = None) -> EvalMetrics:
        models = {m: self.scores(m) for m in self.runs}
        return EvalMetrics(models=models, task_order=list(self.task_order), reference=reference,
                           deltas=EvalMetrics.compute_deltas(models, reference))

    @property
    def detail(self) -> dict[str, dict[str, Any]]:
        return {m: {er.suite.name: er.summary.detail for er in ers if er.summary.detail is not None}
                for m, ers in self.runs.items()}


def task_order(specs: Sequence[SuiteSpec]) -> list[str]:
    """The result columns of `specs`, in order, each once."""
    out: list[str] = []
    for spec in specs:
        for name in suite_of_spec(spec).task_names(spec):
            if name not in out:
                out.append(name)
    return out


def run_entries(lm: LM, specs: Sequence[SuiteSpec], ctx: SuiteContext) -> list[EntryRun]:
    """Every entry's suite on one loaded model."""
    out: list[EntryRun] = []
    for spec in specs:
        suite = suite_of_spec(spec)
        results = suite.run(spec, lm, ctx)
        out.append(EntryRun(spec, suite, results, suite.summarize(spec, results)))
    return out


def default_loader(device: str | None, dtype: str | None, batch_size: int | None) -> Callable[[ModelRef], LM]:
    def load(ref: ModelRef) -> LM:
        from finrecipe.eval.lm import HFLM

        return HFLM.load(ref.path, device=device, dtype=dtype, batch_size=batch_size,
                         trust_remote_code=ref.trust_remote_code)
    return load


def evaluate_models(models: Sequence[ModelRef], specs: Sequence[SuiteSpec], *, out_dir: Path,
                    device: str | None = None, dtype: str | None = None, batch_size: int | None = None,
                    recipe_dir: Path | None = None, cache_dir: Path | None = None,
                    inputs: Mapping[str, ModelRef | DatasetRef] | None = None,
                    progress: Progress | None = None, logger: logging.Logger | None = None,
                    grants: Grants | None = None, load: Callable[[ModelRef], LM] | None = None) -> EvalRun:
    """Run `specs` on each model (loaded one at a time, released before the next)."""
    load = load or default_loader(device, dtype, batch_size)
    logger = logger or logging.getLogger("finrecipe")
    artifacts: dict[str, str] = {}
    runs: dict[str, list[EntryRun]] = {}
    for ref in models:
        logger.info("evaluate: %s (%s)", ref.name, ref.path)
        lm = load(ref)
        ctx = SuiteContext(model=ref.name, out_dir=out_dir, recipe_dir=recipe_dir or Path.cwd(),
                           cache_dir=cache_dir, inputs=inputs or {}, progress=progress or NullProgress(),
                           logger=logger, artifacts=artifacts, grants=grants or Grants())
        runs[ref.name] = run_entries(lm, specs, ctx)
        del lm
        gc.collect()
    return EvalRun(task_order=task_order(specs), runs=runs, artifacts=artifacts)


__all__ = ["EntryRun", "EvalRun", "default_loader", "evaluate_models", "run_entries", "task_order"]
