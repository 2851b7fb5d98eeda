"""`finrecipe eval`, `finrecipe analyze`, `finrecipe report`: option parsing and presentation only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from finrecipe.eval.suite import Summary

_VERSIONS_HELP = "prompt versions: comma list (default, 0.1, 0.1.2, 0.2, 0.2.1, 0.3, 0.4, 0.5, 0.6) or 'all'"


@click.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--suite", type=click.Choice(["jfin"]), default="jfin", show_default=True)
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="harness checkout or the flat copy of its data")
@click.option("--versions", default="default", show_default=True, help=_VERSIONS_HELP)
@click.option("--tasks", default=None, help="comma list of tasks (default: all five)")
@click.option("--batch-size", type=int, default=None, help="max questions per batch (default: by tokens)")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--limit", type=int, default=None, help="first N items of each task")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="write all results here")
def eval_cmd(models: tuple[str, ...], suite: str, data_dir: str, versions: str, tasks: str | None,
             batch_size: int | None, device: str, dtype: str, limit: int | None, json_out: str | None) -> None:
    """Score MODELS on a benchmark suite and print a leaderboard-style table."""
    from finrecipe.cli.ui import RichProgress, console
    from finrecipe.eval.loop import evaluate_models
    from finrecipe.eval.suites.jfin import JfinSpec, detail_json, parse_versions
    from finrecipe.types import ModelRef
    from finrecipe.util.fs import write_text_atomic

    vs = parse_versions(versions)
    ts = [t.strip() for t in tasks.split(",")] if tasks else None
    spec = JfinSpec(suite="jfin", versions=vs, tasks=ts, data_dir=str(Path(data_dir).resolve()), limit=limit)
    refs = [ModelRef(Path(m).name, Path(m)) for m in models]
    with RichProgress() as progress:
        run = evaluate_models(refs, [spec], out_dir=Path.cwd(), device=device, dtype=dtype, batch_size=batch_size,
                              progress=progress)
    summaries = {name: entries[0].summary for name, entries in run.runs.items()}
    console().print(_table(summaries))
    if len(vs) > 1:
        console().print(_versions_table(summaries, vs))
    if json_out:
        result = {"suite": suite, "versions": vs, "limit": limit, "models": {
            ref.name: {"path": str(ref.path),
                       "jfin": {"best_version": s.best_version, "average": s.average, "complete": s.average_complete,
                                "by_version": s.version_averages, "tasks": {r.task: detail_json(r) for r in s.tasks}},
                       "jfin_versions": s.detail}
            for ref, s in ((ref, summaries[ref.name]) for ref in refs)}}
        write_text_atomic(json_out, json.dumps(result, indent=2, ensure_ascii=False))
        console().print(f"results written to {json_out}")


def _table(summaries: dict[str, Summary]) -> object:
    from rich.table import Table

    from finrecipe.eval.tasks.jfin import METRIC, TASKS

    t = Table(title="japanese-lm-fin-harness (0-shot; best prompt version per model)")
    t.add_column("model")
    t.add_column("version")
    t.add_column("Ave.", justify="right")
    for task in TASKS:
        t.add_column(f"{task} ({METRIC[task]})", justify="right")
    for name, s in summaries.items():
        shown = {r.task: r for r in s.tasks}
        cells = []
        for task in TASKS:
            r = shown.get(task)
            if r is None or r.value is None:
                cells.append("missing")
            else:
                se = f" ±{100 * r.stderr:.1f}" if r.stderr is not None else ""
                cells.append(f"{100 * r.value:.2f}{se}")
        ave = "—" if s.average is None else f"{s.average:.2f}" + ("" if s.average_complete else "†")
        t.add_row(name, str(s.best_version), ave, *cells)
    t.caption = "† average over the tasks with data only; a missing task is not scored as zero"
    return t


def _versions_table(summaries: dict[str, Summary], versions: list[str]) -> object:
    from rich.table import Table

    t = Table(title="average per prompt version (100 × metric)")
    t.add_column("model")
    for v in versions:
        t.add_column(v, justify="right")
    for name, s in summaries.items():
        by = s.version_averages or {}
        t.add_row(name, *["—" if by.get(v) is None else f"{by[v]:.2f}" for v in versions])
    return t


@click.command("analyze")
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False), help="the base model")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="analysis", show_default=True)
def analyze_cmd(base: str, models: tuple[str, ...], out_dir: str) -> None:
    """Task-vector analysis: cosine similarities and norms of (MODEL − BASE) for each pair."""
    from finrecipe.analysis import analyze
    from finrecipe.cli.ui import RichProgress, console

    with RichProgress() as progress:
        res = analyze(base, list(models), out_dir=out_dir, progress=progress)
    from rich.table import Table

    t = Table(title="task vectors: global cosine similarity")
    t.add_column("pair")
    t.add_column("cosine", justify="right")
    t.add_column("|δa|", justify="right")
    t.add_column("|δb|", justify="right")
    for p in res["pairs"]:
        t.add_row(f"{p['a']} × {p['b']}", f"{p['cosine']:.4f}", f"{p['norm_a']:.4g}", f"{p['norm_b']:.4g}")
    console().print(t)
    console().print(f"figures: {Path(out_dir) / 'analysis.json'}")


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report_cmd(run_dir: str) -> None:
    """Rebuild report.md / report.html / report.json of a run directory."""
    from finrecipe.cli.ui import console
    from finrecipe.report import build_report

    paths = build_report(Path(run_dir))
    for k, p in paths.items():
        console().print(f"{k}: {p}")


COMMANDS = [eval_cmd, analyze_cmd, report_cmd]
