"""Plots for the report (matplotlib, Agg backend), returned as PNG bytes."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finrecipe.eval.results import EvalMetrics


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def bar_series(metrics: Mapping[str, Any] | EvalMetrics) -> tuple[list[str], dict[str, list[float]]]:
    """Group labels and one list of bar heights per model for `scores_bar_png`: one group per task
    whose results are higher-is-better (×100, or as they are for metrics shown as is, e.g. judge
    scores), then the leaderboard average ("Ave.") when some model has one; NaN where a model has
    no value."""
    from finrecipe.eval.suite import metric_info

    em = metrics if isinstance(metrics, EvalMetrics) else EvalMetrics.from_json(metrics)
    models = list(em.models)
    lower = {t for e in em.models.values() for t, r in e.tasks.items() if r.missing is None and not r.higher_is_better}
    cols = [t for t in em.task_order if t not in lower]
    has_avg = any(e.average is not None for e in em.models.values())
    series: dict[str, list[float]] = {}
    for m in models:
        e = em.models[m]
        vals = []
        for t in cols:
            r = e.tasks.get(t)
            v = r.value if r is not None and r.missing is None else None
            if v is None:
                vals.append(float("nan"))
            else:
                vals.append(100.0 * v if metric_info(r.metric if r else None).percent else v)
        if has_avg:
            vals.append(e.average if e.average is not None else float("nan"))
        series[m] = vals
    return cols + (["Ave."] if has_avg else []), series


def scores_bar_png(metrics: Mapping[str, Any] | EvalMetrics) -> bytes | None:
    """Grouped bars: one group per task, one bar per model (see `bar_series`). None when there is
    nothing to draw."""
    plt = _plt()
    labels, series = bar_series(metrics)
    models = list(series)
    cols = [x for x in labels if x != "Ave."]
    if not models or not cols:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) * max(1, len(models)) * 0.45 + 2), 3.6))
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, series[m], width=width, label=m)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("score (×100)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def loss_curve_png(metrics_jsonl: Path, title: str) -> bytes | None:
    """Training loss against step from a trainer's metrics.jsonl ({"step", "loss"} per line)."""
    steps: list[float] = []
    losses: list[float] = []
    try:
        for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row.get("loss"), (int, float)) and isinstance(row.get("step"), (int, float)):
                steps.append(row["step"])
                losses.append(row["loss"])
    except (OSError, ValueError):
        return None
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)
