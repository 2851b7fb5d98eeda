"""`finrecipe apply` ends with the scores of the evaluate stages and the path of the HTML report, after
a build and after a no-op re-apply (read from the cached nodes, without importing torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from finrecipe.cli import main

REPO = Path(__file__).resolve().parent.parent

EVAL = """
  eval:
    type: evaluate
    models: [base, domain_instruct, final]
    reference: base
    tasks:
      - custom: mc.jsonl
        name: exam
      - files: [held.txt]
        name: held
    analysis: {base: base, vectors: [instruct, domain]}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """merge_tiny + an evaluate stage in a temp directory, applied once with the CLI."""
    d = tmp_path_factory.mktemp("results")
    shutil.copytree(REPO / "recipes" / "assets", d / "assets")
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"question": "w3 w4", "choices": ["w10", "w11"], "answer": 0},
        {"question": "w5 w6", "choices": ["w12 w13", "w14"], "answer": 1}]), encoding="utf-8")
    (d / "held.txt").write_text("w3 w4 w5 w6 w7 w8 w9", encoding="utf-8")
    (d / "r.yaml").write_text((REPO / "recipes" / "merge_tiny.yaml").read_text(encoding="utf-8") + EVAL,
                              encoding="utf-8")
    res = CliRunner().invoke(main, ["apply", "-q", str(d / "r.yaml")], terminal_width=200)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return d, res.output


def _table_lines(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("results: eval"))
    return lines[start:]


def _expected_rows(d: Path) -> list[list[str]]:
    from finrecipe.report import eval_tables

    run = json.loads((d / "runs" / "merge_tiny" / "run.json").read_text())
    ev = next(n for n in run["nodes"] if n["name"] == "eval")
    header, rows, _marks, _deltas = eval_tables(ev["metrics"])
    assert header == ["model", "custom:exam", "ppl:held"]
    return rows


def _check_results(d: Path, output: str) -> None:
    table = _table_lines(output)
    text = "\n".join(table)
    # the header: each task name on two lines, split after its kind ("custom:" / "exam")
    cells2 = [c.strip() for c in table[2].strip("┃").split("┃")]
    cells3 = [c.strip() for c in table[3].strip("┃").split("┃")]
    assert [a + b for a, b in zip(cells2, cells3, strict=True)] == ["model", "custom:exam", "ppl:held"]
    rows = _expected_rows(d)
    for row in rows:  # every model, with the report's cells, in the report's order
        line = next(x for x in table if x.strip("│ ").startswith(row[0] + " "))
        assert [c.strip() for c in line.strip("│").split("│")] == row
    assert [r[0] for r in rows] == ["base", "domain_instruct", "final"]
    run = json.loads((d / "runs" / "merge_tiny" / "run.json").read_text())
    pair = next(n for n in run["nodes"] if n["name"] == "eval")["metrics"]["analysis"]["pairs"][0]
    assert f"task-vector cosine (base base): instruct × domain {pair['cosine']:.4f}" in text
    order = [next(i for i, x in enumerate(table) if x.strip("│ ").startswith(r[0] + " ")) for r in rows]
    assert order == sorted(order)
    # the HTML report's path is the last line
    assert output.rstrip().splitlines()[-1] == f"report: {d / 'runs' / 'merge_tiny' / 'report.html'}"
    assert "bits/byte as is (lower is better); bold = best in the column" in text


def test_apply_ends_with_the_results_table_and_the_report(project: tuple[Path, str]) -> None:
    d, output = project
    summary = output.index("ran 7, reused 0")
    assert output.index("results: eval") > summary > output.index("apply: merge_tiny")
    _check_results(d, output)
    assert (d / "runs" / "merge_tiny" / "report.html").is_file()


def test_noop_apply_prints_the_same_table_without_torch(project: tuple[Path, str]) -> None:
    d, first = project
    res = CliRunner().invoke(main, ["apply", str(d / "r.yaml")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output
    _check_results(d, res.output)
    assert _table_lines(res.output) == _table_lines(first)
    # in a fresh process (where nothing else imported torch), through the real CLI entry point
    code = textwrap.dedent("""\
        import sys
        from finrecipe.cli import main
        try:
            main(["apply", sys.argv[1]])
        except SystemExit as e:
            assert not e.code, e.code
        print("TORCH", "torch" in sys.modules, "transformers" in sys.modules)
        """)
    out = subprocess.run([sys.executable, "-c", code, str(d / "r.yaml")], check=True, capture_output=True,
                         text=True, cwd=d, env={**os.environ, "COLUMNS": "200"})
    assert out.stdout.splitlines()[-1] == "TORCH False False"
    assert "nothing to do" in out.stdout and "results: eval" in out.stdout
    assert "report: runs/merge_tiny/report.html" in out.stdout  # relative to the working directory


def test_no_results_table_without_evaluate_stages(tmp_path: Path) -> None:
    shutil.copytree(REPO / "recipes" / "assets", tmp_path / "assets")
    shutil.copy(REPO / "recipes" / "merge_tiny.yaml", tmp_path / "m.yaml")
    res = CliRunner().invoke(main, ["apply", "-q", str(tmp_path / "m.yaml"), "--only", "base"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "results:" not in res.output
    assert res.output.rstrip().splitlines()[-1].startswith("report: ")
