"""Running multiple-choice suites: items → requests → log-likelihoods → metrics (plain functions).

A task result (one task at one prompt version for one model) is a dict::

    {"task": "fp2", "version": "default", "metric": "acc", "value": 0.31, "stderr": 0.02, "n": 475,
     "metrics": {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., ["f1", "f1_stderr",
                 "f1_norm"]}}

or ``{"task": ..., "version": ..., "missing": "why"}`` when the task's data is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finrecipe.eval.scoring import (
    Request,
    Scorer,
    bootstrap_stderr,
    chabsa_f1,
    mc_predictions,
    mean_stderr,
)
from finrecipe.progress import NullProgress, Progress


@dataclass
class MCItem:
    context: str
    choices: list[str]
    gold: int
    delimiter: str = ""


def score_items(scorer: Scorer, items: Sequence[MCItem], progress: Progress | None = None,
                description: str = "scoring") -> list[list[float]]:
    """Per item, the log-likelihood of each choice (context, delimiter + choice)."""
    reqs: list[Request] = []
    for it in items:
        reqs.extend(Request(it.context, it.delimiter + c) for c in it.choices)
    lls = scorer.loglikelihoods(reqs, progress=progress, description=description)
    out: list[list[float]] = []
    k = 0
    for it in items:
        out.append(lls[k:k + len(it.choices)])
        k += len(it.choices)
    return out


def mc_metrics(items: Sequence[MCItem], lls: Sequence[Sequence[float]], *, f1: bool = False
               ) -> dict[str, Any]:
    """acc, acc_norm (+ chabsa-style f1 / f1_norm) with lm-eval's standard errors."""
    accs: list[float] = []
    accn: list[float] = []
    golds: list[int] = []
    preds: list[int] = []
    preds_n: list[int] = []
    for it, ll in zip(items, lls, strict=False):
        p, pn = mc_predictions(ll, it.choices)
        accs.append(1.0 if p == it.gold else 0.0)
        accn.append(1.0 if pn == it.gold else 0.0)
        golds.append(it.gold)
        preds.append(p)
        preds_n.append(pn)
    n = len(items)
    m: dict[str, Any] = {
        "acc": sum(accs) / n if n else None, "acc_stderr": mean_stderr(accs),
        "acc_norm": sum(accn) / n if n else None, "acc_norm_stderr": mean_stderr(accn),
    }
    if f1:
        m["f1"] = chabsa_f1(golds, preds) if n else None
        m["f1_stderr"] = bootstrap_stderr(golds, preds, chabsa_f1)
        m["f1_norm"] = chabsa_f1(golds, preds_n) if n else None
    m["predictions"] = preds
    return m


def evaluate_jfin(scorer: Scorer, data_dir: str | Path, *, versions: Sequence[str] = ("default",),
                  tasks: Sequence[str] | None = None, limit: int | None = None,
                  progress: Progress | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """results[version][task] for japanese-lm-fin-harness; all requests are scored in one pass."""
    from finrecipe.eval.tasks import jfin

    progress = progress or NullProgress()
    tasks = list(tasks or jfin.TASKS)
    out: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in versions}
    plan: list[tuple[str, str, list[MCItem]]] = []
    for task in tasks:
        try:
            docs = jfin.load_docs(task, data_dir)
        except jfin.TaskDataMissing as e:
            for v in versions:
                out[v][task] = {"task": task, "version": v, "missing": str(e)}
            continue
        if limit is not None:
            docs = docs[:limit]
        for v in versions:
            p = jfin.get_prompt(task, v)
            items = [MCItem(p.context(d), p.doc_to_choice(d), p.gold(d), p.target_delimiter) for d in docs]
            plan.append((task, v, items))
    all_items = [it for _, _, items in plan for it in items]
    lls = score_items(scorer, all_items, progress, "jfin")
    k = 0
    for task, v, items in plan:
        part = lls[k:k + len(items)]
        k += len(items)
        m = mc_metrics(items, part, f1=(task == "chabsa"))
        metric = jfin.METRIC[task]
        res = {"task": task, "version": v, "resolved_version": jfin.get_prompt(task, v).resolved_version,
               "metric": metric, "value": m[metric], "stderr": m.get(f"{metric}_stderr"),
               "n": len(items), "metrics": {kk: vv for kk, vv in m.items() if kk != "predictions"}}
        out[v][task] = res
    return out


def jfin_summary(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Leaderboard view of `evaluate_jfin` output: best version, its average and per-task results."""
    from finrecipe.eval.tasks import jfin

    scores = {v: {t: r.get("value") for t, r in by_task.items()} for v, by_task in results.items()}
    lb = jfin.leaderboard(scores)
    best = lb["best_version"]
    tasks = results[best] if best else next(iter(results.values()), {})
    return {"best_version": best, "average": lb["average"], "complete": bool(best and lb["versions"][best]["complete"]),
            "by_version": {v: x["average"] for v, x in lb["versions"].items()}, "tasks": tasks}
