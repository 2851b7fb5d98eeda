"""The models × tasks table of an `evaluate` node, shared by the report (Markdown, HTML, report.json)
and `finrecipe apply`'s printed results: the same cells in the same order everywhere.

Whether a higher value is better comes from each result (`TaskResult.higher_is_better`); whether a
metric is shown ×100 or as it is comes from the suite that computes it (`eval.suite.metric_info`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finrecipe.eval.results import EvalMetrics, ModelScores, TaskResult
from finrecipe.eval.suite import metric_info

Table = tuple[list[str], list[list[str]], list[list[bool]], list[list[str]] | None]


def _as_metrics(met: EvalMetrics | Mapping[str, Any]) -> EvalMetrics:
    return met if isinstance(met, EvalMetrics) else EvalMetrics.from_json(met)


def fmt_result(r: TaskResult | None) -> str:
    """A cell: ×100 with ± stderr for fractions, 3 decimals for metrics shown as they are."""
    if r is None:
        return "—"
    if r.missing is not None:
        return "missing"
    v = r.value
    if v is None:
        return "—"
    if not metric_info(r.metric).percent:
        return f"{v:.3f}"
    se = r.stderr
    return f"{100 * v:.2f}" + (f" ±{100 * se:.2f}" if se is not None else "")


def fmt_delta(v: float | None, r: TaskResult | None) -> str:
    if v is None:
        return "—"
    if r is not None and not metric_info(r.metric).percent:
        return f"{v:+.3f}"
    return f"{100 * v:+.2f}"


def best_models(models: Mapping[str, ModelScores], task: str | None) -> set[str]:
    """Models with the best value in a column (`task` None: the leaderboard average, higher is
    better); the direction is the results' own. Empty when fewer than two models have a value."""
    vals: dict[str, float] = {}
    higher = True
    for m, e in models.items():
        if task is None:
            if e.average is not None:
                vals[m] = e.average
            continue
        r = e.tasks.get(task)
        if r is not None and r.missing is None and r.value is not None:
            vals[m] = r.value
            higher = r.higher_is_better
    if len(vals) < 2:
        return set()
    target = max(vals.values()) if higher else min(vals.values())
    return {m for m, v in vals.items() if v == target}


def eval_tables(met: EvalMetrics | Mapping[str, Any]) -> Table:
    """(header, rows, best marks per cell, delta rows or None) of an evaluate node's metrics."""
    em = _as_metrics(met)
    models = em.models
    tasks = list(em.task_order)
    has_avg = any(e.average is not None for e in models.values())
    header = ["model"] + (["Ave."] if has_avg else []) + tasks
    rows: list[list[str]] = []
    marks: list[list[bool]] = []
    best_cols = ([best_models(models, None)] if has_avg else []) + [best_models(models, t) for t in tasks]
    for m, e in models.items():
        cells = [m]
        if has_avg:
            cells.append("—" if e.average is None else f"{e.average:.2f}" + ("" if e.average_complete else "†"))
        cells += [fmt_result(e.tasks.get(t)) for t in tasks]
        rows.append(cells)
        marks.append([False] + [m in b for b in best_cols])
    deltas = None
    if em.reference and em.deltas:
        deltas = []
        for m, d in em.deltas.items():
            if m == em.reference:
                continue
            row = [m]
            if has_avg:
                row.append(f"{d['average']:+.2f}" if "average" in d else "—")
            scores = models.get(m, ModelScores())
            row += [fmt_delta(d.get(t), scores.tasks.get(t)) for t in tasks]
            deltas.append(row)
    return header, rows, marks, deltas


def eval_notes(met: EvalMetrics | Mapping[str, Any]) -> list[str]:
    """The legend under a printed results table: the scale, the metrics shown as they are (with
    "lower is better" where their results say so), the best mark and the † mark."""
    from finrecipe.eval.suite import all_suites

    em = _as_metrics(met)
    results = [r for e in em.models.values() for r in e.tasks.values() if r.missing is None]
    present = {r.metric for r in results}
    notes = ["scores ×100"]
    for suite in all_suites():
        for name, info in suite.metrics.items():
            if info.percent or name not in present:
                continue
            lower = any(r.metric == name and not r.higher_is_better for r in results)
            notes.append(f"{info.label or name} as is" + (" (lower is better)" if lower else ""))
    notes.append("bold = best in the column")
    _h, rows, _m, _d = eval_tables(em)
    if any(c.endswith("†") for row in rows for c in row):
        notes.append("† = average over the tasks with data only")
    return notes


__all__ = ["best_models", "eval_notes", "eval_tables", "fmt_delta", "fmt_result"]
