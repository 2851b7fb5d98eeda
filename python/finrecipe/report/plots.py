"""Plots for the report (matplotlib, Agg backend), returned as PNG bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any


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


def bar_series(metrics: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
    """Group labels and one list of bar heights per model for `scores_bar_png`: 100 × value per
    higher-is-better task (judge scores as they are), then the leaderboard average ("Ave.") when
    some model has one; NaN where a model has no value."""
    models = list(metrics.get("models", {}))
    cols = [t for t in metrics.get("task_order", []) if not t.startswith("ppl:")]
    has_avg = any(isinstance(metrics["models"][m].get("average"), (int, float)) for m in models)
    series: dict[str, list[float]] = {}
    for m in models:
        e = metrics["models"][m]
        vals = []
        for t in cols:
            r = e["tasks"].get(t) or {}
            v = r.get("value")
            vals.append(100.0 * v if isinstance(v, (int, float)) and r.get("metric") != "judge_score"
                        else (v if isinstance(v, (int, float)) else float("nan")))
        if has_avg:
            vals.append(e.get("average") if isinstance(e.get("average"), (int, float)) else float("nan"))
        series[m] = vals
    return cols + (["Ave."] if has_avg else []), series


def scores_bar_png(metrics: dict[str, Any]) -> bytes | None:
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
