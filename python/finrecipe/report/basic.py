"""The basic run report: report.md (nodes, every node's metrics and artifacts) and report.json
(the run summary) from `<workdir>/run.json`, with no plots. What the engine writes when the full
report (`finrecipe.report.build_report`) fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finrecipe.report.run import RunRecord, fmt_seconds, load_run, run_summary
from finrecipe.util.fs import write_json_atomic, write_text_atomic


def _fmt_metric(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_basic_markdown(run: RunRecord) -> str:
    r = run.recipe
    lines = [f"# Run report: {r.get('name', '?')}", "",
             f"- recipe: `{r.get('file', '?')}` (sha256 `{str(r.get('sha256', ''))[:16]}`)",
             f"- finrecipe {run.finrecipe_version or '?'}",
             f"- started {run.started or '?'}, finished {run.finished or '?'}", "",
             "## Nodes", "",
             "| node | type | key | status | inputs | time | output |",
             "|---|---|---|---|---|---|---|"]
    for n in run.nodes:
        out = n.raw.get("model_dir") or n.raw.get("out_dir") or ""
        lines.append("| " + " | ".join(_cell(x) for x in (
            n.name, n.type, f"`{n.key}`", n.status, ", ".join(n.inputs) or "—", fmt_seconds(n.seconds),
            f"`{out}`" if out else "—")) + " |")
    with_metrics = [n for n in run.nodes if n.metrics]
    if with_metrics:
        lines += ["", "## Metrics", ""]
        for n in with_metrics:
            lines += [f"### {n.name}", "", "| metric | value |", "|---|---|"]
            for k in sorted(n.metrics):
                lines.append(f"| {_cell(k)} | {_cell(_fmt_metric(n.metrics[k]))} |")
            lines.append("")
    with_art = [n for n in run.nodes if n.artifacts]
    if with_art:
        lines += ["", "## Artifacts", ""]
        for n in with_art:
            for k in sorted(n.artifacts):
                lines.append(f"- {_cell(n.name)} / {_cell(k)}: `{n.artifacts[k]}`")
    if run.failed:
        lines += ["", "## Failures", ""]
        for n in run.failed:
            lines.append(f"- {n.name}: {n.error or 'failed'}")
    return "\n".join(lines).rstrip() + "\n"


def build_basic_report(workdir: str | Path) -> Path:
    """Write `report.md` and `report.json` beside `run.json`; returns the report.md path."""
    wd = Path(workdir)
    run = load_run(wd)
    write_json_atomic(wd / "report.json", run_summary(run))
    md = wd / "report.md"
    write_text_atomic(md, render_basic_markdown(run))
    return md


__all__ = ["build_basic_report", "render_basic_markdown"]
