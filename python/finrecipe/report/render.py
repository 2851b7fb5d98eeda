"""The full report's Markdown and self-contained HTML (plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from typing import Any

from finrecipe.eval.results import EvalMetrics
from finrecipe.report.run import NodeRecord, RunRecord, fmt_seconds
from finrecipe.report.tables import eval_tables

NODE_HEADER = ["node", "type", "key", "status", "inputs", "time", "output"]
LEGEND = "Scores ×100 (bits/byte and judge scores as is)"
Image = tuple[str, str, bytes]  # (section, caption, png)


def evaluations(run: RunRecord) -> list[tuple[NodeRecord, EvalMetrics]]:
    out = []
    for n in run.nodes:
        em = n.evaluation
        if em is not None:
            out.append((n, em))
    return out


def _loss_png(n: NodeRecord) -> bytes | None:
    from finrecipe.report.plots import loss_curve_png

    title = f"{n.name}: training loss"
    p = n.artifact("loss_curve")
    if p is not None and p.is_file():
        return p.read_bytes()
    cand = [n.artifact(k) for k in ("metrics", "metrics_jsonl") if k in n.artifacts]
    if n.out_dir is not None:
        cand += [n.out_dir / "work" / "metrics.jsonl", n.out_dir / "metrics.jsonl"]
    for c in cand:
        if c is not None and c.is_file() and c.suffix == ".jsonl":
            png = loss_curve_png(c, title)
            if png:
                return png
    return None


def images(run: RunRecord) -> list[Image]:
    """(section, caption, png) for every plot the report shows."""
    from finrecipe.report.plots import scores_bar_png

    imgs: list[Image] = []
    for n in run.nodes:
        png = _loss_png(n)
        if png:
            cap = f"{n.name}: training loss" + (" and merge probe curves" if _probe(n) else "")
            imgs.append(("loss", cap, png))
    for n, _em in evaluations(run):
        p = n.artifact("scores_plot")
        png = p.read_bytes() if p is not None and p.is_file() else scores_bar_png(n.metrics)
        if png:
            imgs.append((f"eval:{n.name}", f"{n.name}: scores", png))
        for k in sorted(n.artifacts):
            hp = n.artifact(k)
            if k.startswith("analysis_heatmap") and hp is not None and hp.is_file():
                imgs.append((f"analysis:{n.name}", f"{n.name}: {k}", hp.read_bytes()))
    for n in searches(run):
        pp = n.artifact("pareto_plot")
        if pp is not None and pp.is_file():
            imgs.append((f"search:{n.name}", f"{n.name}: domain score against instruction agreement "
                         "(the selected and the fixed 1.0/1.0 merge marked)", pp.read_bytes()))
    return imgs


def searches(run: RunRecord) -> list[NodeRecord]:
    """The merge searches that finished (metrics schema `finrecipe.merge_search/...`), in order."""
    return [n for n in run.nodes if n.status in ("ran", "cached")
            and str(n.metrics.get("schema", "")).startswith("finrecipe.merge_search")]


def _probe(n: NodeRecord) -> dict[str, Any] | None:
    p = n.metrics.get("probe") if isinstance(n.metrics, dict) else None
    return p if isinstance(p, dict) and str(p.get("schema", "")).startswith("finrecipe.merge_probe") else None


def probes(run: RunRecord) -> list[NodeRecord]:
    """Training nodes that finished with a merge probe (metrics `probe`, `finrecipe.merge_probe/...`)."""
    return [n for n in run.nodes if n.status in ("ran", "cached") and _probe(n) is not None]


def probe_text(n: NodeRecord) -> tuple[str, str]:
    """(a sentence on what the probe chose, the data it used)."""
    p = _probe(n) or {}
    best = p.get("best") or {}
    agr = best.get("agreement")
    scores = (f"{best['bits_per_byte']:.4f} bits/byte" if isinstance(best.get("bits_per_byte"), (int, float))
              else "no score") + ("" if not isinstance(agr, (int, float)) else f", agreement {agr:.4f}")
    m = n.metrics
    text = (f"Merge probe of base + {p.get('weight')}·({p.get('instruct')} − base) + (θ_t − base) every "
            f"{p.get('every_steps')} steps: {p.get('probes')} probes; the best at step {p.get('best_step')} "
            f"({scores}; rule {(p.get('rule') or {}).get('rule')}"
            + ("" if p.get("constraint_met") is not False else ", constraint not met") + "). ")
    if p.get("keep") == "best":
        text += f"The stage output is the best probed checkpoint (step {p.get('output_step')})"
    else:
        text += f"The stage output is the last trained step ({p.get('output_step')})"
    if p.get("stopped_early"):
        text += (f"; training stopped early after step {m.get('steps')} of {m.get('planned_steps')} "
                 f"({p.get('stop_when_no_improvement')} probes without improvement)")
    text += "."
    sel = p.get("selection_data") or {}
    used = _signals_used(sel)
    protected = ", ".join(map(str, p.get("protected") or [])) or "none"
    return text, "; ".join(used) + f". Protected (never optimised on): {protected}."


def _signals_used(sel: dict[str, Any]) -> list[str]:
    """The no-instruction-data signals a selection used (domain bits/byte, instruction agreement), as
    phrases, from a merge search's or a merge probe's `selection_data`."""
    used = []
    dom = sel.get("domain")
    if isinstance(dom, dict):
        used.append(f"domain: bits/byte on {dom.get('what')} ({dom.get('documents')} documents)")
    ins = sel.get("instruction")
    if isinstance(ins, dict):
        used.append(f"instruction agreement on the instruct model's answers to {ins.get('count')} prompts "
                    f"of {ins.get('prompts')}")
    return used


def _search_text(n: NodeRecord) -> tuple[str, str, list[list[str]]]:
    """(the search's summary sentence, what data the selection used, the trial table rows)."""
    m = n.metrics
    raw_sel = m.get("selection_data")
    sel: dict[str, Any] = raw_sel if isinstance(raw_sel, dict) else {}
    used = _signals_used(sel)
    if sel.get("tasks"):
        used.append("development tasks: " + ", ".join(map(str, sel["tasks"])))
    protected = ", ".join(map(str, m.get("protected") or [])) or "none"
    data = "; ".join(used) + f". Protected (never optimised on): {protected}."
    rows: list[list[str]] = []
    tp = n.artifact("trials_table")
    if tp is not None and tp.is_file():
        for line in tp.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and not all(set(c) <= {"-", ":", ""} for c in cells):
                rows.append(cells)
    return str(m.get("summary") or ""), data, rows


def _node_rows(run: RunRecord) -> list[list[str]]:
    rows = []
    for n in run.nodes:
        out = n.raw.get("model_dir") or n.raw.get("out_dir") or ""
        rows.append([n.name, n.type, n.key[:16], n.status, ", ".join(n.inputs) or "—", fmt_seconds(n.seconds),
                     str(out) or "—"])
    return rows


def _pair_rows(em: EvalMetrics) -> list[list[str]]:
    an = em.analysis or {}
    return [[f"{p['a']} × {p['b']}", "—" if p["cosine"] is None else f"{p['cosine']:.4f}",
             f"{p['norm_a']:.4g}", f"{p['norm_b']:.4g}"] for p in an.get("pairs", [])]


def md_table(header: list[str], rows: list[list[str]], marks: list[list[bool]] | None = None) -> list[str]:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        cs = [f"**{cell(c)}**" if marks and marks[i][j] else cell(c) for j, c in enumerate(r)]
        out.append("| " + " | ".join(cs) + " |")
    return out


def render_markdown(run: RunRecord, image_files: dict[int, str], imgs: list[Image] | None = None) -> str:
    r = run.recipe
    lines = [f"# Run report: {r.get('name', '?')}", "",
             f"- recipe: `{r.get('file', '?')}` (sha256 `{str(r.get('sha256', ''))[:16]}`)",
             f"- finrecipe {run.finrecipe_version or '?'}; started {run.started or '?'}, "
             f"finished {run.finished or '?'}", "", "## Nodes", ""]
    lines += md_table(NODE_HEADER, _node_rows(run))
    imgs = images(run) if imgs is None else imgs
    for n, em in evaluations(run):
        header, rows, marks, deltas = eval_tables(em)
        lines += ["", f"## Evaluation: {n.name}", "",
                  f"{LEGEND}; **bold** = best in the column; † = average over the tasks with data only.", ""]
        lines += md_table(header, rows, marks)
        if deltas:
            lines += ["", f"Deltas against the reference model `{em.reference}`:", ""]
            lines += md_table(header, deltas)
        if em.analysis:
            lines += ["", "### Task-vector analysis", "", f"Base: `{em.analysis.get('base')}`", ""]
            lines += md_table(["pair", "cosine", "|δa|", "|δb|"], _pair_rows(em))
    for n in searches(run):
        summary, data, rows = _search_text(n)
        lines += ["", f"## Merge search: {n.name}", "", summary, "", f"Selection data: {data}"]
        if rows:
            lines += [""] + md_table(rows[0], rows[1:])
    for n in probes(run):
        text, data = probe_text(n)
        lines += ["", f"## Merge probe: {n.name}", "", text, "", f"Selection data: {data}"]
    if imgs:
        lines += ["", "## Plots", ""]
        for i, (_sec, cap, _png) in enumerate(imgs):
            if i in image_files:
                lines.append(f"![{cap}]({image_files[i]})")
    if run.failed:
        lines += ["", "## Failures", ""] + [f"- {n.name}: {n.error or 'failed'}" for n in run.failed]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem}th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th{background:#f3f4f6}table.nodes td,table.nodes th{text-align:left}td:first-child,th:first-child{text-align:left}td.best{font-weight:700;background:#e8f5e9}
.meta{color:#555;font-size:.9rem}figure{display:inline-block;margin:.5rem}figcaption{font-size:.8rem;color:#555}
img{max-width:100%;border:1px solid #eee}.ok{color:#2e7d32}.failed{color:#c62828}code{font-size:.85em}
"""


def html_table(header: list[str], rows: list[list[str]], marks: list[list[bool]] | None = None,
               cls: str = "") -> str:
    e = html.escape
    attr = f" class='{cls}'" if cls else ""
    out = [f"<table{attr}><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        tds = []
        for j, c in enumerate(r):
            best = bool(marks and marks[i][j])
            td = '<td class="best">' if best else "<td>"
            tds.append(f"{td}{e(c)}{' ★' if best else ''}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(run: RunRecord, imgs: list[Image] | None = None) -> str:
    e = html.escape
    r = run.recipe
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>finrecipe report: "
             f"{e(str(r.get('name', '?')))}</title><style>{_CSS}</style></head><body>",
             f"<h1>Run report: {e(str(r.get('name', '?')))}</h1>",
             f"<p class='meta'>recipe <code>{e(str(r.get('file', '?')))}</code> (sha256 "
             f"<code>{e(str(r.get('sha256', ''))[:16])}</code>) · finrecipe {e(str(run.finrecipe_version or '?'))}"
             f" · started {e(str(run.started or '?'))} · finished {e(str(run.finished or '?'))}</p>",
             "<h2>Nodes</h2>", html_table(NODE_HEADER, _node_rows(run), cls="nodes")]
    imgs = images(run) if imgs is None else imgs

    def figs(prefix: str) -> str:
        out = []
        for sec, cap, png in imgs:
            if sec == prefix:
                b64 = base64.b64encode(png).decode("ascii")
                out.append(f"<figure><img alt='{e(cap)}' src='data:image/png;base64,{b64}'>"
                           f"<figcaption>{e(cap)}</figcaption></figure>")
        return "".join(out)

    for n, em in evaluations(run):
        header, rows, marks, deltas = eval_tables(em)
        parts += [f"<h2>Evaluation: {e(n.name)}</h2>",
                  f"<p class='meta'>{LEGEND}; ★ = best in the column; "
                  "† = average over the tasks with data only (a missing task is not scored as zero).</p>",
                  html_table(header, rows, marks)]
        if deltas:
            parts += [f"<p>Deltas against the reference model <code>{e(str(em.reference))}</code>:</p>",
                      html_table(header, deltas)]
        parts.append(figs(f"eval:{n.name}"))
        if em.analysis:
            parts += ["<h2>Task-vector analysis</h2>", f"<p>Base: <code>{e(str(em.analysis.get('base')))}</code></p>",
                      html_table(["pair", "cosine", "|δa|", "|δb|"], _pair_rows(em)),
                      figs(f"analysis:{n.name}")]
    for n in searches(run):
        summary, data, rows = _search_text(n)
        parts += [f"<h2>Merge search: {e(n.name)}</h2>", f"<p>{e(summary)}</p>",
                  f"<p class='meta'>Selection data: {e(data)}</p>", figs(f"search:{n.name}")]
        if rows:  # (markdown emphasis in the trial table becomes plain text)
            plain = [[c.replace("**", "") for c in r] for r in rows]
            parts.append(html_table(plain[0], plain[1:]))
    for n in probes(run):
        text, data = probe_text(n)
        parts += [f"<h2>Merge probe: {e(n.name)}</h2>", f"<p>{e(text)}</p>",
                  f"<p class='meta'>Selection data: {e(data)}</p>"]
    loss = figs("loss")
    if loss:
        parts += ["<h2>Continual pretraining: loss curves</h2>", loss]
    if run.failed:
        parts.append("<h2>Failures</h2><ul>" + "".join(
            f"<li class='failed'>{e(n.name)}: {e(n.error or 'failed')}</li>" for n in run.failed) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["NODE_HEADER", "evaluations", "html_table", "images", "md_table", "probe_text", "probes", "render_html",
           "render_markdown", "searches"]
