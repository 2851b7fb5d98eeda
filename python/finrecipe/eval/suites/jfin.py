"""`suite: jfin`: japanese-lm-fin-harness (chabsa, cma_basics, cpa_audit, fp2, security_sales_1),
0-shot, at one or more prompt versions; the leaderboard average over the best version.

    - suite: jfin
      versions: [default, "0.3"]     # or "all"
      tasks: [fp2, chabsa]           # default: all five
      data_dir: path/to/data         # required: a harness checkout, the flat copy, or "download"
      limit: null                    # first N items of each task

Prompts and data files: `finrecipe.eval.tasks.jfin`. All requests of all tasks and versions are
scored in one pass. One result per task and version (headline metric: f1 for chabsa, acc
otherwise); a task whose files are absent is reported as missing, never as zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from finrecipe.errors import ConfigError
from finrecipe.eval.lm import LM
from finrecipe.eval.mc import MCItem, mc_metrics, score_items
from finrecipe.eval.results import TaskResult
from finrecipe.eval.suite import KeyPath, Suite, SuiteContext, SuiteSpec, Summary, file_requests, register
from finrecipe.eval.tasks import jfin
from finrecipe.progress import Progress

if TYPE_CHECKING:
    from finrecipe.node import CheckContext
    from finrecipe.types import Request as Grant

DATA_DIR_HELP = ("set `data_dir:` to the japanese-lm-fin-harness data: a checkout of "
                 "https://github.com/pfnet-research/japanese-lm-fin-harness, a directory with its data files "
                 "(fp2.json, cma_basics.json, security_sales_1.json, cpa_audit.xlsx, and chABSA's chabsa.zip from "
                 "Kaggle or its unpacked chABSA-dataset/), or \"download\"")


class JfinSpec(SuiteSpec):
    suite: Literal["jfin"]
    versions: list[str] | Literal["all"] = Field(default_factory=lambda: ["default"])
    tasks: list[str] | None = None
    data_dir: str | None = None  # required (checked below, with a message saying what to give)
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _data_dir_given(self) -> JfinSpec:
        if self.data_dir is None:
            raise ValueError(f"data_dir: missing; {DATA_DIR_HELP}")
        return self


def parse_versions(spec: str | Sequence[str]) -> list[str]:
    """Prompt versions from "all", a comma list or a list; unknown ones are an error."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(jfin.VERSIONS)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    vs = list(spec)
    bad = [v for v in vs if v not in jfin.VERSIONS]
    if bad:
        raise ConfigError(f"unknown prompt version(s) {', '.join(bad)}; known: {', '.join(jfin.VERSIONS)} or 'all'")
    return vs


def score_jfin(lm: LM, data_dir: str | Path, *, versions: Sequence[str] = ("default",),
               tasks: Sequence[str] | None = None, limit: int | None = None, suite_version: str = "1",
               progress: Progress | None = None) -> list[TaskResult]:
    """One result per (task, version): missing tasks first, then the scored ones, each group in
    task order then version order (the order of the detailed results)."""
    tasks = list(tasks or jfin.TASKS)
    missing: list[TaskResult] = []
    plan: list[tuple[str, str, list[MCItem]]] = []
    for task in tasks:
        try:
            docs = jfin.load_docs(task, data_dir)
        except jfin.TaskDataMissing as e:
            missing += [TaskResult.absent(task, str(e), version=v, suite_version=suite_version) for v in versions]
            continue
        if limit is not None:
            docs = docs[:limit]
        for v in versions:
            p = jfin.get_prompt(task, v)
            items = [MCItem(p.context(d), p.doc_to_choice(d), p.gold(d), p.target_delimiter) for d in docs]
            plan.append((task, v, items))
    all_items = [it for _, _, items in plan for it in items]
    lls = score_items(lm, all_items, progress, "jfin")
    out: list[TaskResult] = []
    k = 0
    for task, v, items in plan:
        part = lls[k:k + len(items)]
        k += len(items)
        m = mc_metrics(items, part, f1=(task == "chabsa"))
        metric = jfin.METRIC[task]
        out.append(TaskResult(task=task, metric=metric, value=m[metric], stderr=m.get(f"{metric}_stderr"),
                              n=len(items), higher_is_better=True, suite_version=suite_version, version=v,
                              metrics={kk: vv for kk, vv in m.items() if kk != "predictions"},
                              extra={"resolved_version": jfin.get_prompt(task, v).resolved_version}))
    return missing + out


def by_version(results: Sequence[TaskResult]) -> dict[str, dict[str, TaskResult]]:
    out: dict[str, dict[str, TaskResult]] = {}
    for r in results:
        out.setdefault(str(r.version), {})[r.task] = r
    return out


def detail_json(r: TaskResult) -> dict[str, Any]:
    """A result as results.json (and `finrecipe eval --json`) record it."""
    if r.missing is not None:
        return {"task": r.task, "version": r.version, "missing": r.missing}
    return {"task": r.task, "version": r.version, "resolved_version": r.extra.get("resolved_version"),
            "metric": r.metric, "value": r.value, "stderr": r.stderr, "n": r.n, "metrics": r.metrics}


def leaderboard(results: Sequence[TaskResult], versions: Sequence[str]) -> tuple[dict[str, Any],
                                                                                 dict[str, dict[str, TaskResult]]]:
    """(the harness's leaderboard over the results, the results by version in `versions` order)."""
    byv = by_version(results)
    byv = {v: byv.get(v, {}) for v in versions}
    lb = jfin.leaderboard({v: {t: r.value for t, r in by.items()} for v, by in byv.items()})
    return lb, byv


@register
class Jfin(Suite[JfinSpec]):
    name = "jfin"
    # 2: cpa_audit's empty choices read "nan", the harness's leaderboard rule, Gemma's BOS (issue 15)
    version = "2"
    Spec = JfinSpec

    def task_names(self, spec: JfinSpec) -> list[str]:
        return list(spec.tasks or jfin.TASKS)

    def requests(self, spec: JfinSpec, cc: CheckContext, where: KeyPath) -> list[Grant]:
        if spec.data_dir in (None, "download"):
            return []
        return file_requests(cc, where, "data_dir", [spec.data_dir])

    def data_dir(self, spec: JfinSpec, ctx: SuiteContext) -> Path:
        if spec.data_dir is None:
            raise ConfigError(f"jfin: data_dir: missing; {DATA_DIR_HELP}")
        if spec.data_dir == "download":
            if ctx.cache_dir is None:
                raise ConfigError("jfin: data_dir \"download\" needs a cache directory (run it in a recipe)")
            return jfin.download_data(ctx.cache_dir)
        return ctx.path(spec.data_dir)

    def run(self, spec: JfinSpec, lm: LM, ctx: SuiteContext) -> list[TaskResult]:
        return score_jfin(lm, self.data_dir(spec, ctx), versions=parse_versions(spec.versions), tasks=spec.tasks,
                          limit=spec.limit, suite_version=self.version, progress=ctx.progress)

    def summarize(self, spec: JfinSpec, results: list[TaskResult]) -> Summary:
        lb, byv = leaderboard(results, parse_versions(spec.versions))
        best = lb["best_version"]
        shown = byv[best] if best else next(iter(byv.values()), {})
        return Summary(tasks=list(shown.values()), average=lb["average"],
                       average_complete=bool(best and lb["versions"][best]["complete"]), best_version=best,
                       by_version={v: {t: r.value for t, r in by.items()} for v, by in byv.items()},
                       version_averages={v: x["average"] for v, x in lb["versions"].items()},
                       detail={v: {t: detail_json(r) for t, r in by.items()} for v, by in byv.items()},
                       has_leaderboard=True)


__all__ = ["DATA_DIR_HELP", "Jfin", "JfinSpec", "by_version", "detail_json", "leaderboard", "parse_versions",
           "score_jfin"]
