"""The run report: `build_report(workdir)` reads `<workdir>/run.json` and writes `report.md`,
`report.json` and one self-contained `report.html` (plots embedded as base64 PNG, no external
resources) beside it.

Contents: the recipe and timing, every node (key, inputs, outputs, time, status), for each `evaluate`
node a models × tasks table with the leaderboard average (best per column marked, in each result's
own direction: lower-is-better metrics such as bits/byte handled), deltas against the reference
model, a bar chart and the task-vector analysis (global cosines and the layer × module heatmaps);
CPT loss curves from training nodes (`artifacts["loss_curve"]` PNG, or drawn from
`artifacts["metrics"]` / `metrics.jsonl`), with a merge probe's curves beside the loss and a
section naming the best probe, the stage's output step and the data the probe used; a merge
search's section (trial table, Pareto plot).

Modules: `run` (run.json read into typed records; the shared run summary), `tables` (the results
table shared with `finrecipe apply`), `render` (Markdown, HTML), `plots` (matplotlib PNGs),
`basic` (the plain report without plots).
"""

from __future__ import annotations

import json
from pathlib import Path

from finrecipe.report.basic import build_basic_report
from finrecipe.report.render import evaluations, images, render_html, render_markdown
from finrecipe.report.run import RunRecord, load_run, run_summary
from finrecipe.report.tables import eval_notes, eval_tables
from finrecipe.util.fs import write_bytes_atomic, write_text_atomic

# Transitional: `finrecipe.cli.recipe` imports the table under its old private name.

def build_report(workdir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and report.html (+ report_assets/*.png for the Markdown)."""
    wd = Path(workdir)
    run = load_run(wd)
    imgs = images(run)
    image_files: dict[int, str] = {}
    for i, (_sec, _cap, png) in enumerate(imgs):
        name = f"plot_{i}.png"
        write_bytes_atomic(wd / "report_assets" / name, png)
        image_files[i] = f"report_assets/{name}"
    evals = []
    for n, em in evaluations(run):
        header, rows, marks, deltas = eval_tables(em)
        evals.append({"node": n.raw.get("name"), "header": header, "rows": rows, "best": marks,
                      "deltas": deltas, "reference": em.reference, "metrics": n.raw.get("metrics")})
    summary = {**run_summary(run), "evaluations": evals,
               "plots": [image_files.get(i) for i in range(len(imgs))]}
    paths = {"markdown": wd / "report.md", "json": wd / "report.json", "html": wd / "report.html"}
    write_text_atomic(paths["json"], json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    write_text_atomic(paths["markdown"], render_markdown(run, image_files, imgs))
    write_text_atomic(paths["html"], render_html(run, imgs))
    return paths


__all__ = ["RunRecord", "build_basic_report", "build_report", "eval_notes", "eval_tables", "load_run",
           "run_summary"]
