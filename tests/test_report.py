"""The run report: report.md / report.json / self-contained report.html, and a headless-Chromium check.

CI needs the Debian package `chromium` for the screenshot test (skipped when absent)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from finrecipe.report import build_report


def _task(v: float | None, metric: str = "acc", higher: bool = True) -> dict:
    return {"metric": metric, "value": v, "stderr": 0.01, "n": 10, "higher_is_better": higher}


def _png(tmp: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    p = tmp / name
    f.savefig(p)
    plt.close(f)
    return p


def _run(tmp: Path) -> Path:
    wd = tmp / "work"
    (wd / "cpt" / "k1").mkdir(parents=True)
    (wd / "cpt2" / "k2" / "work").mkdir(parents=True)
    (wd / "eval" / "k3").mkdir(parents=True)
    _png(wd / "cpt" / "k1", "loss.png")
    (wd / "cpt2" / "k2" / "work" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 / (s + 1)}) + "\n" for s in range(20)))
    heat = _png(wd / "eval" / "k3", "heatmap_0.png")
    models = {
        "base": {"average": 40.0, "average_complete": False, "best_version": "default",
                 "tasks": {"chabsa": {"missing": "no data"}, "fp2": _task(0.30), "cma_basics": _task(0.50),
                           "ppl:held": _task(1.20, "bits_per_byte", False)}},
        "merged": {"average": 45.0, "average_complete": False, "best_version": "0.3",
                   "tasks": {"chabsa": {"missing": "no data"}, "fp2": _task(0.40), "cma_basics": _task(0.50),
                             "ppl:held": _task(1.10, "bits_per_byte", False)}},
    }
    metrics = {"schema": "finrecipe.evaluate/1", "reference": "base",
               "task_order": ["chabsa", "fp2", "cma_basics", "ppl:held"], "models": models,
               "deltas": {"base": {"fp2": 0.0, "cma_basics": 0.0, "ppl:held": 0.0, "average": 0.0},
                          "merged": {"fp2": 0.10, "cma_basics": 0.0, "ppl:held": -0.10, "average": 5.0}},
               "analysis": {"base": "base", "pairs": [{"a": "instruct", "b": "domain", "cosine": 0.0123,
                                                       "norm_a": 3.0, "norm_b": 4.0, "dot": 0.1}]}}
    run = {"recipe": {"name": "demo <fin>", "file": "recipes/demo.yaml", "sha256": "a" * 64},
           "finrecipe_version": "0.1.0", "started": "2026-11-24T00:00:00Z", "finished": "2026-11-24T01:00:00Z",
           "nodes": [
               {"name": "cpt", "type": "continual_pretraining", "key": "1" * 64, "status": "ran", "inputs": ["base"],
                "out_dir": str(wd / "cpt" / "k1"), "model_dir": str(wd / "cpt" / "k1" / "model"), "seconds": 300.0,
                "metrics": {"final_loss": 2.1}, "artifacts": {"loss_curve": "loss.png"}},
               {"name": "cpt2", "type": "continual_pretraining", "key": "2" * 64, "status": "cached",
                "inputs": ["base"], "out_dir": str(wd / "cpt2" / "k2"), "model_dir": None, "seconds": 1.0,
                "metrics": {}, "artifacts": {}},
               {"name": "eval", "type": "evaluate", "key": "3" * 64, "status": "ran", "inputs": ["base", "merged"],
                "out_dir": str(wd / "eval" / "k3"), "model_dir": None, "seconds": 12.5, "metrics": metrics,
                "artifacts": {"analysis_heatmap_0": str(heat)}},
           ]}
    (wd / "run.json").write_text(json.dumps(run))
    return wd


def test_report_files(tmp_path: Path) -> None:
    wd = _run(tmp_path)
    paths = build_report(wd)
    md = paths["markdown"].read_text()
    assert "| cpt | continual_pretraining | 1111111111111111 | ran | base | 5.0 min |" in md
    # best per column: merged wins fp2 and the average; cma_basics is a tie (both bold); lower bits/byte wins
    row = next(line for line in md.splitlines() if line.startswith("| merged |"))
    assert "**45.00†**" in row and "**40.00 ±1.00**" in row and "**1.100**" in row and "missing" in row
    base_row = next(line for line in md.splitlines() if line.startswith("| base |"))
    assert "**50.00 ±1.00**" in base_row and "**1.200**" not in base_row
    assert "| merged | +5.00 | — | +10.00 | +0.00 | -0.100 |" in md
    assert "instruct × domain | 0.0123" in md
    rep = json.loads(paths["json"].read_text())
    assert rep["evaluations"][0]["reference"] == "base"
    assert [n["name"] for n in rep["nodes"]] == ["cpt", "cpt2", "eval"]
    assert len(rep["plots"]) == 4  # loss png, loss from metrics.jsonl, scores bar chart, heatmap
    for p in rep["plots"]:
        assert (wd / p).read_bytes()[:4] == b"\x89PNG"
    html = paths["html"].read_text()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(imgs) == 4 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", html)  # self-contained
    assert "demo &lt;fin&gt;" in html and "★" in html


def test_report_cli_rebuilds(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from finrecipe.cli import main

    wd = _run(tmp_path)
    res = CliRunner().invoke(main, ["report", str(wd)])
    assert res.exit_code == 0, res.output
    assert (wd / "report.html").is_file()
    res2 = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res2.exit_code == 2 and "run.json" in res2.output


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian package: chromium)")
def test_html_opens_in_headless_chromium(tmp_path: Path) -> None:
    wd = _run(tmp_path)
    html = build_report(wd)["html"]
    shot = tmp_path / "shot.png"
    base = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--user-data-dir=" + str(tmp_path / "profile"), "--window-size=1280,2400"]
    r = subprocess.run([*base, f"--screenshot={shot}", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20000
    dom = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    assert "Evaluation: eval" in dom.stdout and dom.stdout.count("<img") == 4
    assert "Uncaught" not in dom.stderr and "ERR_FILE_NOT_FOUND" not in dom.stderr


def test_bar_series_has_average_group_only_when_there_is_one() -> None:
    from finrecipe.report.plots import bar_series

    def metrics(avg: float | None) -> dict:
        return {"task_order": ["a", "ppl:x"],
                "models": {"m": {"average": avg, "tasks": {"a": {"metric": "acc", "value": 0.5},
                                                           "ppl:x": {"metric": "bits_per_byte", "value": 1.2,
                                                                     "higher_is_better": False}}}}}

    labels, series = bar_series(metrics(None))  # lower-is-better results get no bars beside scores
    assert labels == ["a"] and series == {"m": [50.0]}
    labels, series = bar_series(metrics(40.0))
    assert labels == ["a", "Ave."] and series == {"m": [50.0, 40.0]}


def test_eval_notes_take_scale_and_direction_from_the_suites_and_results() -> None:
    from finrecipe.report import eval_notes, eval_tables

    def task(metric: str, v: float, higher: bool = True) -> dict:
        return {"metric": metric, "value": v, "stderr": None, "n": 3, "higher_is_better": higher}

    met = {"task_order": ["fp2", "ppl:h", "gen:p"], "models": {
        "a": {"average": 30.0, "average_complete": False,
              "tasks": {"fp2": task("acc", 0.3), "ppl:h": task("bits_per_byte", 1.25, False),
                        "gen:p": task("judge_score", 6.5)}},
        "b": {"average": None, "tasks": {"fp2": task("acc", 0.2), "ppl:h": task("bits_per_byte", 1.5, False),
                                         "gen:p": task("judge_score", 7.0)}}}}
    assert eval_notes(met) == ["scores ×100", "bits/byte as is (lower is better)", "judge scores as is",
                               "bold = best in the column", "† = average over the tasks with data only"]
    header, rows, marks, _ = eval_tables(met)
    assert header == ["model", "Ave.", "fp2", "ppl:h", "gen:p"]
    assert rows == [["a", "30.00†", "30.00", "1.250", "6.500"], ["b", "—", "20.00", "1.500", "7.000"]]
    # best per column in each result's own direction: a's lower bits/byte, b's higher judge score
    assert marks == [[False, False, True, True, False], [False, False, False, False, True]]


def test_a_merge_search_gets_its_own_section(tmp_path: Path) -> None:
    wd = _run(tmp_path)
    sd = wd / "searched" / "k4"
    sd.mkdir(parents=True)
    _png(sd, "pareto.png")
    (sd / "trials.md").write_text("| trial | role | merge | bits/byte | agreement |\n|---|---|---|---|---|\n"
                                  "| a1 | fixed | task_arithmetic (instruct 1, finance 1) | 0.6483 | 0.8572 |\n"
                                  "| b2 | search | ties (instruct 1.1, finance 1.0) | 0.4044 | 0.0787 |\n")
    run = json.loads((wd / "run.json").read_text())
    run["nodes"].append({
        "name": "searched", "type": "merge_search", "key": "4" * 64, "status": "ran", "inputs": ["base"],
        "out_dir": str(sd), "model_dir": str(sd / "model"), "seconds": 48.0,
        "metrics": {"schema": "finrecipe.merge_search/1", "summary": "Selected task_arithmetic (x).",
                    "protected": ["jfin"],
                    "selection_data": {"domain": {"what": "finance_dev", "documents": 60},
                                       "instruction": {"prompts": "instruct.jsonl", "count": 60}, "tasks": []}},
        "artifacts": {"pareto_plot": "pareto.png", "trials_table": "trials.md"}})
    (wd / "run.json").write_text(json.dumps(run))
    paths = build_report(wd)
    md = paths["markdown"].read_text()
    assert "## Merge search: searched" in md and "Selected task_arithmetic (x)." in md
    assert "bits/byte on finance_dev (60 documents)" in md and "Protected (never optimised on): jfin" in md
    assert "| b2 | search | ties (instruct 1.1, finance 1.0) | 0.4044 | 0.0787 |" in md
    html = paths["html"].read_text()
    assert "Merge search: searched" in html and "domain score against instruction agreement" in html
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 5  # the Pareto plot besides the four
