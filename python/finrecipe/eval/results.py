"""Typed evaluation results (the bottom of `finrecipe.eval`: imports nothing of finrecipe's).

- `TaskResult`: one task of one suite for one model (at one prompt version where a suite has them).
- `ModelScores`: a model's row of the `evaluate` stage's metrics (per-task results, leaderboard).
- `EvalMetrics`: the `evaluate` stage's metrics, schema ``finrecipe.evaluate/1`` (what run.json,
  the report and `finrecipe apply`'s results table read).

`to_json` writes exactly the schema the stage has always written; `from_json` reads it back
(leniently: a run.json of an older finrecipe or a hand-edited one gives `None` where a value is
absent). Whether a higher value is better is part of every result: readers take it from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "finrecipe.evaluate/1"


@dataclass(frozen=True)
class TaskResult:
    """One task's score. `metrics` holds every metric the task computed (``acc``, ``acc_stderr``,
    ``acc_norm``...); `metric`/`value` is the headline one. A task whose data is absent has
    `missing` set (the reason) and no value: it is reported as missing, never as zero."""

    task: str
    metric: str | None
    value: float | None
    stderr: float | None = None
    n: int | None = None
    higher_is_better: bool = True
    suite_version: str = "1"
    # The prompt version of suites that have several (jfin), else None.
    version: str | None = None
    metrics: dict[str, Any] | None = None
    missing: str | None = None
    # Suite-specific facts kept in the detailed results (e.g. jfin's resolved prompt version).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def absent(cls, task: str, why: str, *, version: str | None = None, suite_version: str = "1"
               ) -> TaskResult:
        return cls(task=task, metric=None, value=None, version=version, missing=why,
                   suite_version=suite_version)

    @property
    def scored(self) -> bool:
        return self.missing is None and isinstance(self.value, (int, float))

    def to_json(self) -> dict[str, Any]:
        """The task's entry in the stage's metrics (``models.<m>.tasks.<task>``)."""
        if self.missing is not None:
            return {"missing": self.missing}
        d: dict[str, Any] = {"metric": self.metric, "value": self.value, "stderr": self.stderr, "n": self.n,
                             "version": self.version, "higher_is_better": self.higher_is_better}
        if self.metrics is not None:
            d["metrics"] = self.metrics
        return d

    @classmethod
    def from_json(cls, task: str, d: Mapping[str, Any]) -> TaskResult:
        if "missing" in d:
            return cls.absent(task, str(d["missing"]), version=d.get("version"))
        v = d.get("value")
        se = d.get("stderr")
        n = d.get("n")
        met = d.get("metrics")
        return cls(task=task, metric=d.get("metric"), value=_float(v), stderr=_float(se),
                   n=int(n) if isinstance(n, int) and not isinstance(n, bool) else None,
                   higher_is_better=bool(d.get("higher_is_better", True)), version=d.get("version"),
                   metrics=dict(met) if isinstance(met, Mapping) else None)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float(v: Any) -> float | None:
    return float(v) if _num(v) else None


@dataclass
class ModelScores:
    """One model's results: per task (in the stage's task order), and the jfin leaderboard view
    (average over the best prompt version) when the model was scored on jfin."""

    tasks: dict[str, TaskResult] = field(default_factory=dict)
    average: float | None = None
    average_complete: bool = False
    best_version: str | None = None
    # jfin: prompt version → task → metric value (None when missing)
    jfin_versions: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"average": self.average, "average_complete": self.average_complete,
                "best_version": self.best_version, "tasks": {k: r.to_json() for k, r in self.tasks.items()},
                "jfin_versions": self.jfin_versions}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelScores:
        tasks = d.get("tasks") if isinstance(d.get("tasks"), Mapping) else {}
        avg = d.get("average")
        jv = d.get("jfin_versions")
        return cls(tasks={str(k): TaskResult.from_json(str(k), r) for k, r in (tasks or {}).items()
                          if isinstance(r, Mapping)},
                   average=_float(avg),
                   average_complete=bool(d.get("average_complete", True)),
                   best_version=d.get("best_version"),
                   jfin_versions=dict(jv) if isinstance(jv, Mapping) else {})


@dataclass
class EvalMetrics:
    """The `evaluate` stage's metrics (``StageResult.metrics``), schema ``finrecipe.evaluate/1``."""

    models: dict[str, ModelScores]
    task_order: list[str]
    reference: str | None = None
    # model → task (or "average") → value − the reference model's value
    deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    analysis: dict[str, Any] | None = None

    @staticmethod
    def compute_deltas(models: Mapping[str, ModelScores], reference: str | None) -> dict[str, dict[str, float]]:
        if reference is None or reference not in models:
            return {}
        ref = models[reference]
        out: dict[str, dict[str, float]] = {}
        for m, e in models.items():
            d: dict[str, float] = {}
            for k, r in e.tasks.items():
                rr = ref.tasks.get(k)
                if r.value is not None and rr is not None and rr.value is not None:
                    d[k] = r.value - rr.value
            if e.average is not None and ref.average is not None:
                d["average"] = e.average - ref.average
            out[m] = d
        return out

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "reference": self.reference, "task_order": self.task_order,
                "models": {m: s.to_json() for m, s in self.models.items()}, "deltas": self.deltas,
                "analysis": self.analysis}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalMetrics:
        models = {str(m): ModelScores.from_json(e) for m, e in (d.get("models") or {}).items()
                  if isinstance(e, Mapping)}
        order = d.get("task_order")
        if not isinstance(order, list) or not order:
            order = sorted({t for s in models.values() for t in s.tasks})
        deltas = d.get("deltas") if isinstance(d.get("deltas"), Mapping) else {}
        an = d.get("analysis")
        return cls(models=models, task_order=[str(t) for t in order], reference=d.get("reference"),
                   deltas={str(m): dict(v) for m, v in (deltas or {}).items() if isinstance(v, Mapping)},
                   analysis=dict(an) if isinstance(an, Mapping) else None)

    @staticmethod
    def is_eval_metrics(d: Any) -> bool:
        """Whether a node's metrics are an evaluate stage's (they have a models mapping)."""
        return isinstance(d, Mapping) and isinstance(d.get("models"), Mapping)


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is shown: as a percentage (×100, the default for fractions) or as it is,
    and the short label the results table's note uses for metrics shown as they are."""

    percent: bool = True
    label: str = ""


__all__ = ["SCHEMA", "EvalMetrics", "MetricInfo", "ModelScores", "TaskResult"]
