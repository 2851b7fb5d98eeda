"""The CI-sized subset of the mergekit oracle harness (`make parity` runs the whole matrix).

mergekit 0.1.5 is installed once into .venv-mergekit (about 20 s from PyPI: torch and transformers
are reused from the project venv through a .pth file, only mergekit's other dependencies are
downloaded); the subset's models are a few MB and the run takes a couple of minutes. Every row must
pass by its verdict rule: deterministic methods within 1 bf16 ulp of mergekit's own output, top-k
methods differing only where a tie at a selection threshold is proven, DARE with binomial kept
fractions and exact L1 rescaling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("FINRECIPE_SKIP_PARITY") == "1",
                    reason="FINRECIPE_SKIP_PARITY=1 (the mergekit venv needs PyPI once)")
def test_ci_subset_matches_mergekit(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "parity" / "run.py"), "--ci", "--json", str(rows_file)],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert rows_file.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    methods = {row["case"].split("-")[0] for row in rows}
    assert {"linear", "task_arithmetic", "ties", "breadcrumbs_ties", "dare_linear", "slerp"} <= methods
    assert {row["dtype"] for row in rows} == {"f32", "bf16"}
    failed = [f"{row['case']} {row['dtype']}: {row['verdict']} ({row['unexplained']} unexplained) {row['detail']}"
              for row in rows if row["verdict"] != "pass"]
    assert not failed, "\n".join(failed)
    assert r.returncode == 0, r.stdout[-3000:]
