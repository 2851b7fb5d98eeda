"""The run report: `build_report(workdir)` reads `<workdir>/run.json` and writes `report.md`,
`report.json` and one self-contained `report.html` (plots embedded as base64 PNG, no external
resources) beside it.

Contents: the recipe and timing, every node (key, inputs, outputs, time, status), for each `evaluate`
node a models × tasks table with the leaderboard average (best per column marked, lower-is-better
metrics such as bits/byte handled), deltas against the reference model, a bar chart and the
task-vector analysis (global cosines and the layer × module heatmaps); CPT loss curves from training
nodes (`artifacts["loss_curve"]` PNG, or drawn from `artifacts["metrics"]` / `metrics.jsonl`).
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from finrecipe.errors import FormatError
from finrecipe.recipe.report_basic import run_summary

__all__ = ["build_report", "load_run"]


def load_run(workdir: Path) -> dict[str, Any]:
    p = workdir / "run.json"
    try:
        run = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{p} not found: run `finrecipe apply` first, or pass the recipe's work directory") from None
    except ValueError as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("nodes", []), list):
        raise FormatError(f"{p}: expected an object with a 'nodes' list")
    return run


def _artifact_path(node: dict[str, Any], value: str) -> Path:
    p = Path(value)
    if not p.is_absolute() and node.get("out_dir"):
        p = Path(node["out_dir"]) / p
    return p


def _fmt_s(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _fmt_v(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    if "missing" in r:
        return "missing"
    v = r.get("value")
    if not isinstance(v, (int, float)):
        return "—"
    if r.get("metric") in ("bits_per_byte", "judge_score"):
        return f"{v:.3f}"
    se = r.get("stderr")
    return f"{100 * v:.2f}" + (f" ±{100 * se:.2f}" if isinstance(se, (int, float)) else "")


def _best(models: dict[str, Any], task: str) -> set[str]:
    vals = {}
    higher = True
    for m, e in models.items():
        r = (e.get("tasks") or {}).get(task) if task != "__avg__" else {"value": e.get("average")}
        if r and isinstance(r.get("value"), (int, float)):
            vals[m] = r["value"]
            higher = r.get("higher_is_better", True)
    if len(vals) < 2:
        return set()
    target = max(vals.values()) if higher else min(vals.values())
    return {m for m, v in vals.items() if v == target}


def _evaluations(run: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n in run.get("nodes", []):
        met = n.get("metrics") or {}
        if n.get("type") == "evaluate" and isinstance(met.get("models"), dict):
            out.append({"node": n, "metrics": met})
    return out


def _images(run: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """(section, caption, png) for every plot the report shows."""
    from finrecipe.report.plots import loss_curve_png, scores_bar_png

    imgs: list[tuple[str, str, bytes]] = []
    for n in run.get("nodes", []):
        arts = n.get("artifacts") or {}
        name = str(n.get("name"))
        if "loss_curve" in arts and _artifact_path(n, arts["loss_curve"]).is_file():
            imgs.append(("loss", f"{name}: training loss", _artifact_path(n, arts["loss_curve"]).read_bytes()))
        else:
            cand = [arts[k] for k in ("metrics", "metrics_jsonl") if k in arts]
            if n.get("out_dir"):
                cand += [str(Path(n["out_dir"]) / "work" / "metrics.jsonl"), str(Path(n["out_dir"]) / "metrics.jsonl")]
            for c in cand:
                p = _artifact_path(n, c)
                if p.is_file() and p.suffix == ".jsonl":
                    png = loss_curve_png(p, f"{name}: training loss")
                    if png:
                        imgs.append(("loss", f"{name}: training loss", png))
                        break
    for ev in _evaluations(run):
        n, met = ev["node"], ev["metrics"]
        arts = n.get("artifacts") or {}
        png = None
        if "scores_plot" in arts and _artifact_path(n, arts["scores_plot"]).is_file():
            png = _artifact_path(n, arts["scores_plot"]).read_bytes()
        else:
            png = scores_bar_png(met)
        if png:
            imgs.append((f"eval:{n.get('name')}", f"{n.get('name')}: scores", png))
        for k in sorted(arts):
            if k.startswith("analysis_heatmap") and _artifact_path(n, arts[k]).is_file():
                imgs.append((f"analysis:{n.get('name')}", f"{n.get('name')}: {k}",
                             _artifact_path(n, arts[k]).read_bytes()))
    return imgs


def _eval_tables(met: dict[str, Any]) -> tuple[list[str], list[list[str]], list[list[bool]], list[list[str]] | None]:
    models = met["models"]
    tasks = list(met.get("task_order") or sorted({t for e in models.values() for t in e.get("tasks", {})}))
    has_avg = any(e.get("average") is not None for e in models.values())
    header = ["model"] + (["Ave."] if has_avg else []) + tasks
    rows: list[list[str]] = []
    marks: list[list[bool]] = []
    best_cols = ([_best(models, "__avg__")] if has_avg else []) + [_best(models, t) for t in tasks]
    for m, e in models.items():
        avg = e.get("average")
        cells = [m]
        if has_avg:
            cells.append("—" if avg is None else f"{avg:.2f}" + ("" if e.get("average_complete", True) else "†"))
        cells += [_fmt_v(e.get("tasks", {}).get(t)) for t in tasks]
        rows.append(cells)
        marks.append([False] + [m in b for b in best_cols])
    deltas = None
    ref = met.get("reference")
    if ref and met.get("deltas"):
        deltas = []
        for m, d in met["deltas"].items():
            if m == ref:
                continue
            row = [m]
            if has_avg:
                row.append(f"{d['average']:+.2f}" if "average" in d else "—")
            for t in tasks:
                v = d.get(t)
                r = models[m].get("tasks", {}).get(t) or {}
                if not isinstance(v, (int, float)):
                    row.append("—")
                elif r.get("metric") in ("bits_per_byte", "judge_score"):
                    row.append(f"{v:+.3f}")
                else:
                    row.append(f"{100 * v:+.2f}")
            deltas.append(row)
    return header, rows, marks, deltas


def _md_table(header: list[str], rows: list[list[str]], marks: list[list[bool]] | None = None) -> list[str]:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        cs = [f"**{cell(c)}**" if marks and marks[i][j] else cell(c) for j, c in enumerate(r)]
        out.append("| " + " | ".join(cs) + " |")
    return out


def _node_rows(run: dict[str, Any]) -> list[list[str]]:
    rows = []
    for n in run.get("nodes", []):
        out = n.get("model_dir") or n.get("out_dir") or ""
        rows.append([str(n.get("name")), str(n.get("type")), str(n.get("key", ""))[:16], str(n.get("status")),
                     ", ".join(n.get("inputs") or []) or "—", _fmt_s(n.get("seconds")), str(out) or "—"])
    return rows


NODE_HEADER = ["node", "type", "key", "status", "inputs", "time", "output"]


def render_markdown(run: dict[str, Any], image_files: dict[int, str]) -> str:
    r = run.get("recipe", {}) or {}
    lines = [f"# Run report: {r.get('name', '?')}", "",
             f"- recipe: `{r.get('file', '?')}` (sha256 `{str(r.get('sha256', ''))[:16]}`)",
             f"- finrecipe {run.get('finrecipe_version', '?')}; started {run.get('started', '?')}, "
             f"finished {run.get('finished', '?')}", "", "## Nodes", ""]
    lines += _md_table(NODE_HEADER, _node_rows(run))
    imgs = _images(run)
    for ev in _evaluations(run):
        n, met = ev["node"], ev["metrics"]
        header, rows, marks, deltas = _eval_tables(met)
        lines += ["", f"## Evaluation: {n.get('name')}", "",
                  "Scores ×100 (bits/byte and judge scores as is); **bold** = best in the column; "
                  "† = average over the tasks with data only.", ""]
        lines += _md_table(header, rows, marks)
        if deltas:
            lines += ["", f"Deltas against the reference model `{met.get('reference')}`:", ""]
            lines += _md_table(header, deltas)
        an = met.get("analysis")
        if an:
            lines += ["", "### Task-vector analysis", "", f"Base: `{an.get('base')}`", ""]
            lines += _md_table(["pair", "cosine", "|δa|", "|δb|"],
                               [[f"{p['a']} × {p['b']}", "—" if p["cosine"] is None else f"{p['cosine']:.4f}",
                                 f"{p['norm_a']:.4g}", f"{p['norm_b']:.4g}"] for p in an.get("pairs", [])])
    if imgs:
        lines += ["", "## Plots", ""]
        for i, (_sec, cap, _png) in enumerate(imgs):
            if i in image_files:
                lines.append(f"![{cap}]({image_files[i]})")
    failed = [n for n in run.get("nodes", []) if n.get("status") == "failed"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- {n.get('name')}: {n.get('error', 'failed')}" for n in failed]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f3f4f6}table.nodes td,table.nodes th{text-align:left}td:first-child,th:first-child{text-align:left}td.best{font-weight:700;background:#e8f5e9}
.meta{color:#555;font-size:.9rem}figure{display:inline-block;margin:.5rem}figcaption{font-size:.8rem;color:#555}
img{max-width:100%;border:1px solid #eee}.ok{color:#2e7d32}.failed{color:#c62828}code{font-size:.85em}
"""


def _html_table(header: list[str], rows: list[list[str]], marks: list[list[bool]] | None = None,
                cls: str = "") -> str:
    e = html.escape
    attr = f" class='{cls}'" if cls else ""
    out = [f"<table{attr}><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        tds = []
        for j, c in enumerate(r):
            cls = ' class="best"' if marks and marks[i][j] else ""
            star = " ★" if marks and marks[i][j] else ""
            tds.append(f"<td{cls}>{e(c)}{star}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(run: dict[str, Any]) -> str:
    e = html.escape
    r = run.get("recipe", {}) or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>finrecipe report: "
             f"{e(str(r.get('name', '?')))}</title><style>{_CSS}</style></head><body>",
             f"<h1>Run report: {e(str(r.get('name', '?')))}</h1>",
             f"<p class='meta'>recipe <code>{e(str(r.get('file', '?')))}</code> (sha256 "
             f"<code>{e(str(r.get('sha256', ''))[:16])}</code>) · finrecipe {e(str(run.get('finrecipe_version', '?')))}"
             f" · started {e(str(run.get('started', '?')))} · finished {e(str(run.get('finished', '?')))}</p>",
             "<h2>Nodes</h2>", _html_table(NODE_HEADER, _node_rows(run), cls="nodes")]
    imgs = _images(run)

    def figs(prefix: str) -> str:
        out = []
        for sec, cap, png in imgs:
            if sec == prefix:
                b64 = base64.b64encode(png).decode("ascii")
                out.append(f"<figure><img alt='{e(cap)}' src='data:image/png;base64,{b64}'>"
                           f"<figcaption>{e(cap)}</figcaption></figure>")
        return "".join(out)

    for ev in _evaluations(run):
        n, met = ev["node"], ev["metrics"]
        header, rows, marks, deltas = _eval_tables(met)
        parts += [f"<h2>Evaluation: {e(str(n.get('name')))}</h2>",
                  "<p class='meta'>Scores ×100 (bits/byte and judge scores as is); ★ = best in the column; "
                  "† = average over the tasks with data only (a missing task is not scored as zero).</p>",
                  _html_table(header, rows, marks)]
        if deltas:
            parts += [f"<p>Deltas against the reference model <code>{e(str(met.get('reference')))}</code>:</p>",
                      _html_table(header, deltas)]
        parts.append(figs(f"eval:{n.get('name')}"))
        an = met.get("analysis")
        if an:
            parts += ["<h2>Task-vector analysis</h2>", f"<p>Base: <code>{e(str(an.get('base')))}</code></p>",
                      _html_table(["pair", "cosine", "|δa|", "|δb|"],
                                  [[f"{p['a']} × {p['b']}", "—" if p["cosine"] is None else f"{p['cosine']:.4f}",
                                    f"{p['norm_a']:.4g}", f"{p['norm_b']:.4g}"] for p in an.get("pairs", [])]),
                      figs(f"analysis:{n.get('name')}")]
    loss = figs("loss")
    if loss:
        parts += ["<h2>Continual pretraining: loss curves</h2>", loss]
    failed = [n for n in run.get("nodes", []) if n.get("status") == "failed"]
    if failed:
        parts.append("<h2>Failures</h2><ul>" + "".join(
            f"<li class='failed'>{e(str(n.get('name')))}: {e(str(n.get('error', 'failed')))}</li>" for n in failed)
            + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    tmp.replace(path)


def build_report(workdir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and report.html (+ report_assets/*.png for the Markdown)."""
    wd = Path(workdir)
    run = load_run(wd)
    imgs = _images(run)
    assets = wd / "report_assets"
    image_files: dict[int, str] = {}
    if imgs:
        assets.mkdir(exist_ok=True)
        for i, (_sec, _cap, png) in enumerate(imgs):
            name = f"plot_{i}.png"
            _write(assets / name, png)
            image_files[i] = f"report_assets/{name}"
    evals = []
    for ev in _evaluations(run):
        header, rows, marks, deltas = _eval_tables(ev["metrics"])
        evals.append({"node": ev["node"].get("name"), "header": header, "rows": rows, "best": marks,
                      "deltas": deltas, "reference": ev["metrics"].get("reference"),
                      "metrics": ev["metrics"]})
    summary = {
        **run_summary(run),
        "evaluations": evals,
        "plots": [image_files.get(i) for i in range(len(imgs))],
    }
    paths = {"markdown": wd / "report.md", "json": wd / "report.json", "html": wd / "report.html"}
    _write(paths["json"], json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    _write(paths["markdown"], render_markdown(run, image_files))
    _write(paths["html"], render_html(run))
    return paths
