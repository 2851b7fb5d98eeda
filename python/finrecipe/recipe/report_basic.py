"""A basic run report (report.md + report.json) rendered from `<workdir>/run.json`.

Used when the full report package (`finrecipe.report`) is not available or fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finrecipe.errors import FormatError
from finrecipe.recipe.cache import write_json_atomic


def _fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _fmt_metric(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The part of report.json both reports share: the recipe, timing, status counts and nodes."""
    nodes = run.get("nodes", [])
    return {
        "recipe": run.get("recipe"), "finrecipe_version": run.get("finrecipe_version"),
        "started": run.get("started"), "finished": run.get("finished"),
        "counts": {s: sum(1 for n in nodes if n.get("status") == s)
                   for s in ("ran", "cached", "failed", "pending")},
        "nodes": [{k: n.get(k) for k in ("name", "type", "key", "status", "inputs", "out_dir", "model_dir",
                                          "seconds", "metrics", "artifacts")} for n in nodes],
    }


def render_markdown(run: dict[str, Any]) -> str:
    r = run.get("recipe", {})
    lines = [f"# Run report: {r.get('name', '?')}", "",
             f"- recipe: `{r.get('file', '?')}` (sha256 `{str(r.get('sha256', ''))[:16]}`)",
             f"- finrecipe {run.get('finrecipe_version', '?')}",
             f"- started {run.get('started', '?')}, finished {run.get('finished', '?')}", "",
             "## Nodes", "",
             "| node | type | key | status | inputs | time | output |",
             "|---|---|---|---|---|---|---|"]
    nodes = run.get("nodes", [])
    for n in nodes:
        out = n.get("model_dir") or n.get("out_dir") or ""
        lines.append("| " + " | ".join(_cell(x) for x in (
            n.get("name"), n.get("type"), f"`{n.get('key', '')}`", n.get("status"),
            ", ".join(n.get("inputs") or []) or "—", _fmt_seconds(n.get("seconds")),
            f"`{out}`" if out else "—")) + " |")
    with_metrics = [n for n in nodes if n.get("metrics")]
    if with_metrics:
        lines += ["", "## Metrics", ""]
        for n in with_metrics:
            lines += [f"### {n.get('name')}", "", "| metric | value |", "|---|---|"]
            for k in sorted(n["metrics"]):
                lines.append(f"| {_cell(k)} | {_cell(_fmt_metric(n['metrics'][k]))} |")
            lines.append("")
    with_art = [n for n in nodes if n.get("artifacts")]
    if with_art:
        lines += ["", "## Artifacts", ""]
        for n in with_art:
            for k in sorted(n["artifacts"]):
                lines.append(f"- {_cell(n.get('name'))} / {_cell(k)}: `{n['artifacts'][k]}`")
    failed = [n for n in nodes if n.get("status") == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        for n in failed:
            lines.append(f"- {n.get('name')}: {n.get('error', 'failed')}")
    return "\n".join(lines).rstrip() + "\n"


def build_report(workdir: str | Path) -> Path:
    """Write `report.md` and `report.json` beside `run.json`; returns the report.md path."""
    wd = Path(workdir)
    try:
        run = json.loads((wd / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{wd / 'run.json'} not found: run `finrecipe apply` first") from None
    except ValueError as e:
        raise FormatError(f"{wd / 'run.json'}: not valid JSON ({e})") from None
    write_json_atomic(wd / "report.json", run_summary(run))
    md = wd / "report.md"
    tmp = md.with_name(".report.md.tmp")
    tmp.write_text(render_markdown(run), encoding="utf-8")
    tmp.replace(md)
    return md
