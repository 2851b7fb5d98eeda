"""Recipe-engine overhead: how long `finrecipe apply` takes when there is nothing to do.

Copies recipes/merge_tiny.yaml (+ assets) to a temporary directory, builds it once, then runs the
CLI alternately for `apply` (no-op), `plan` and `--help`, several times each, as fresh processes
(what a user waits for), and prints medians. Also checks that the no-op path imports no torch.

    .venv/bin/python bench/bench_recipe.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINRECIPE = str(Path(sys.executable).parent / "finrecipe")


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of a child process."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        shutil.copy(REPO / "recipes" / "merge_tiny.yaml", d / "merge_tiny.yaml")
        shutil.copytree(REPO / "recipes" / "assets", d / "assets")
        first, _ = _timed([FINRECIPE, "apply", "-q", "merge_tiny.yaml"], d)
        cmds = {
            "apply (no-op)": [FINRECIPE, "apply", "-q", "merge_tiny.yaml"],
            "plan": [FINRECIPE, "plan", "merge_tiny.yaml"],
            "validate": [FINRECIPE, "validate", "merge_tiny.yaml"],
            "--help": [FINRECIPE, "--help"],
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for _ in range(args.runs):
            for k, c in cmds.items():
                times[k].append(_timed(c, d))
        code = ("import sys; from finrecipe import load_recipe; r = load_recipe('merge_tiny.yaml').apply(); "
                "print(r.noop, 'torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], cwd=d, check=True, capture_output=True,
                             text=True).stdout.split()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {load:.1f}")
    print(f"first apply of merge_tiny (3 init models + 3 merges, torch import included): {first:.2f} s")
    print(f"no-op apply: noop={out[0]}, torch imported={out[1]}")
    print()
    print("| command (fresh process) | wall median | wall min | CPU median (user+sys) |")
    print("|---|---|---|---|")
    for k, v in times.items():
        wall = [w for w, _ in v]
        cpu = [c for _, c in v]
        print(f"| `finrecipe {k}` | {statistics.median(wall):.3f} s | {min(wall):.3f} s | "
              f"{statistics.median(cpu):.3f} s |")


if __name__ == "__main__":
    main()
