"""mergekit as the oracle: run a generated matrix of merge configs through mergekit and finrecipe.

    make parity                                   # the full matrix; writes its section of BENCHMARKS.md
    .venv/bin/python bench/parity/run.py --ci     # the CI-sized subset (what `make test` runs)
    .venv/bin/python bench/parity/run.py --only ties --only linear   # cases whose name contains a word

mergekit (the version pinned below) lives in its own venv, .venv-mergekit, which reuses the project
venv's torch through a .pth file instead of downloading a second torch (mergekit 0.1.5 accepts the
project's torch and transformers versions; pip installs only what is missing). Models: small bf16
trios built by models.py. Each case runs in both tools with the same config file; check.py gives the
verdict. Outputs stay under bench/out/parity/ (mergekit's are reused while config and version match).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# The oracle's arithmetic, fixed so that its output does not depend on the machine's core count:
# mergekit's bf16 whole-tensor sums (norms, L1 rescale factors, model_stock's cosines) are torch's
# two-pass parallel reductions, one partial sum per torch thread rounded to bf16, so they change with
# the thread count; with one thread they are the sequential reference. torch's vectorised kernels stay
# on (they are what users run: linear's fused multiply-adds, for instance), except for the cases that
# name ATen's scalar kernels in their `mk_env` (arcee_fusion: the vectorised softmax's fast exp differs
# in the last bits between vector widths, finrecipe replays the scalar kernel). The checker
# (check.py, this process) recomputes bf16 sums and arcee_fusion's float32 KL, so it runs with one
# thread and the scalar kernels. finrecipe runs with its defaults (its results do not depend on its
# thread count).
MERGEKIT_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CHECKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
_OUTER_ENV = {k: os.environ.get(k) for k in CHECKER_ENV}
if __name__ == "__main__":
    # before torch is imported (check.py); only as the program: a process that imports this module
    # (a test, bench_merge.py for ensure_mergekit) keeps its environment, which its own child
    # processes inherit (the leak once made a test's subprocess run ATen's scalar kernels)
    os.environ.update(CHECKER_ENV)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check import Result, compare  # noqa: E402
from matrix import CASES, Case, instantiate  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench" / "out" / "parity"
MK_VENV = ROOT / ".venv-mergekit"
MERGEKIT = "mergekit==0.1.5"
SECTION = "## Merge parity with mergekit (oracle harness)"


def log(msg: str) -> None:
    print(f"[parity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_mergekit() -> Path:
    """.venv-mergekit with the pinned mergekit; torch and friends come from the project venv."""
    py = MK_VENV / "bin" / "python"
    marker = MK_VENV / ".installed"
    if marker.is_file() and marker.read_text() == MERGEKIT:
        return py
    log(f"installing {MERGEKIT} into {MK_VENV.name} (once; torch is reused from the project venv)")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz-finrecipe-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", MERGEKIT], check=True)
    marker.write_text(MERGEKIT)
    return py


def mergekit_version(py: Path) -> str:
    """mergekit's and torch's versions as the oracle reports them."""
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                       capture_output=True, text=True)
    v = r.stdout.split()
    return f"mergekit {v[0]} (torch {v[1]})" if len(v) == 2 else "mergekit ?"


def ensure_models() -> Path:
    d = OUT / "models"
    subprocess.run([sys.executable, str(Path(__file__).with_name("models.py")), str(d)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return d


def slug(case: Case, dtype: str) -> str:
    return f"{case.name.replace('/', '_')}-{dtype}"


def child_env() -> dict[str, str]:
    """The environment for the tools' processes: offline, and CHECKER_ENV's variables as they were
    before this process set them for its own torch."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k, v in _OUTER_ENV.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_finrecipe(exe: list[str], config: Path, out: Path) -> tuple[bool, str, float]:
    t0 = time.perf_counter()
    env = child_env()  # finrecipe as the user runs it, not under the checker's settings
    r = subprocess.run([*exe, "merge", str(config), str(out), "--overwrite", "-q", "--seed", "0"],
                       capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        return False, (lines[-1] if lines else f"exit {r.returncode}")[:300], dt
    return True, "", dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ci", action="store_true", help="only the CI-sized subset")
    ap.add_argument("--only", action="append", default=[], help="cases whose name contains this (repeatable)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], help="one compute dtype only")
    ap.add_argument("--finrecipe", default=str(ROOT / ".venv" / "bin" / "finrecipe"),
                    help="the finrecipe command (a path, or a quoted command line)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--render", type=Path, metavar="ROWS_JSON",
                    help="only re-render the table (and BENCHMARKS.md) from rows written by --json")
    a = ap.parse_args()
    if a.render:
        by_name = {c.name: c for c in CASES}
        rows = [(by_name[x["case"]], x["dtype"], Result(**{k: v for k, v in x.items()
                                                            if k not in ("case", "dtype", "rule")}))
                for x in json.loads(a.render.read_text())]
        table = render(rows, mergekit_version(MK_VENV / "bin" / "python"))
        print(table)
        if not a.no_write:
            write_section(table)
        return 0

    cases = [c for c in CASES if (not a.ci or c.ci) and (not a.only or any(w in c.name for w in a.only))]
    jobs = [(c, dt) for c in cases for dt in c.dtypes if not a.dtype or dt == a.dtype]
    py = ensure_mergekit()
    version = mergekit_version(py)
    models = ensure_models()
    log(f"{len(jobs)} configs; {version}")
    models_version = (models / "VERSION").read_text()  # mergekit's outputs are redone when the models change

    mk_jobs, dirs = [], {}
    for case, dt in jobs:
        variants = {v: str(models / case.family / v) for v in ("base", "instruct", "cpt", "far")}
        cfg = instantiate(case, dt, variants)
        d = OUT / "cases" / slug(case, dt)
        d.mkdir(parents=True, exist_ok=True)
        text = json.dumps(cfg, indent=2)  # JSON is YAML; both tools read the same file
        (d / "config.yml").write_text(text)
        key = hashlib.sha256((text + version + models_version + json.dumps({**MERGEKIT_ENV, **case.mk_env})).encode()).hexdigest()[:16]
        dirs[(case.name, dt)] = (d, cfg)
        done = d / "mergekit.done"
        if done.is_file() and done.read_text() == key and (d / "mergekit").is_dir():
            continue
        shutil.rmtree(d / "mergekit", ignore_errors=True)
        (d / "mergekit.error").unlink(missing_ok=True)
        mk_jobs.append({"config": str(d / "config.yml"), "out": str(d / "mergekit"), "seed": 0, "key": key,
                        "dir": str(d), "copy_tokenizer": "chat_template" in cfg,
                        "env": {**MERGEKIT_ENV, **case.mk_env}})
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in mk_jobs:  # one mergekit process per environment
        groups.setdefault(json.dumps(job["env"], sort_keys=True), []).append(job)
    for gi, (env_key, group) in enumerate(groups.items()):
        log(f"mergekit: {len(group)} configs (one process; {env_key})")
        jf = OUT / f"mergekit-jobs-{gi}.json"
        rf = OUT / f"mergekit-results-{gi}.json"
        jf.write_text(json.dumps(group))
        env = {**child_env(), **json.loads(env_key)}
        subprocess.run([str(py), str(Path(__file__).with_name("mk_driver.py")), str(jf), str(rf)], check=True,
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for job, res in zip(group, json.loads(rf.read_text()), strict=True):
            d = Path(job["dir"])
            if res["ok"]:
                (d / "mergekit.done").write_text(job["key"])
            else:
                (d / "mergekit.error").write_text(res["error"])

    exe = a.finrecipe.split() if " " in a.finrecipe else [a.finrecipe]
    rows = []
    for case, dt in jobs:
        d, cfg = dirs[(case.name, dt)]
        err = d / "mergekit.error"
        if err.is_file():
            r = Result("mergekit-error", detail=err.read_text()[:200])
        else:
            ok, msg, _ = run_finrecipe(exe, d / "config.yml", d / "finrecipe")
            r = (compare(cfg, case.rule, d / "finrecipe", d / "mergekit", case.mk_f32_promotion) if ok
                 else Result("refused", detail=msg))
        rows.append((case, dt, r))
        log(f"{case.name:34s} {dt:4s} {case.rule:6s} {r.verdict:8s} differing {r.differing:>8d} "
            f"beyond-1ulp {r.beyond:>7d} explained {r.explained:>8d} unexplained {r.unexplained:>7d} "
            f"max {r.max_ulps:8.1f} {r.detail[:120]} {json.dumps(r.extra) if r.extra else ''}")
    table = render(rows, version)
    print(table)
    if a.json:
        a.json.write_text(json.dumps([{"case": c.name, "dtype": dt, "rule": c.rule, **r.__dict__}
                                      for c, dt, r in rows], indent=1))
    if not a.ci and not a.only and not a.dtype and not a.no_write:
        write_section(table)
        log("BENCHMARKS.md updated")
    failed = [r for _, _, r in rows if r.verdict != "pass"]
    print(f"parity: {len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def render(rows: list[tuple[Case, str, Result]], version: str) -> str:
    n = len(rows)
    by: dict[str, int] = {}
    for c, dt, r in rows:
        v = r.verdict + (" (by design)" if r.verdict != "pass" and _by_design(c, dt) else "")
        by[v] = by.get(v, 0) + 1
    lines = [
        f"Oracle: {version}, run from its own venv (`make parity`, bench/parity/) with one torch thread "
        "(`OMP_NUM_THREADS=1`: its bf16 whole-tensor sums are per-thread partial sums otherwise), and for "
        "arcee_fusion with ATen's scalar kernels (`ATEN_CPU_CAPABILITY=default`: its vectorised softmax's exp "
        "depends on the CPU's vector width); finrecipe runs with its defaults. Small bf16 trios built "
        "locally (llama 4 layers; qwen2 with tied embeddings; mixtral with 4 experts). `f32` rows: "
        "`dtype: float32, out_dtype: bfloat16` (random rules: `dtype: float32`, float32 output); "
        "`bf16` rows: `dtype: bfloat16`. Rules: exact = every element within 1 bf16 ulp; topk = elements "
        "beyond 1 ulp must be proven selection ties (on Mixtral's fused expert tensors: finrecipe's value "
        "reproduced from per-expert selections, mergekit's from the fused one); random = every element reproduced by a keep-mask "
        "with exact L1 rescaling, kept fraction within 5σ of the binomial expectation.",
        "",
        f"Totals: {n} configs, " + ", ".join(f"{v} {k}" for k, v in sorted(by.items())) + ".",
        "",
        "| config | dtype | rule | verdict | elements | differing | beyond 1 ulp | explained | unexplained | max ulps | note |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c, dt, r in rows:
        note = "; ".join(x for x in (c.note, r.detail.replace("|", "/")[:100],
                                     f"kept/expected {r.extra['kept']}" if r.extra.get("kept") else "") if x)
        verdict = r.verdict + (" (by design)" if r.verdict != "pass" and _by_design(c, dt) else "")
        lines.append(f"| {c.name} | {dt} | {c.rule} | {verdict} | {r.total} | {r.differing} | {r.beyond} | "
                     f"{r.explained} | {r.unexplained} | {r.max_ulps:.1f} | {note} |")
    return "\n".join(lines)


def _by_design(c: Case, dtype: str) -> bool:
    """The case's note marks its difference as by design (for one dtype when it says "(bf16 row")."""
    if not c.note.startswith("by design"):
        return False
    return "(bf16 row" not in c.note or dtype == "bf16"


def write_section(table: str) -> None:
    p = ROOT / "BENCHMARKS.md"
    text = p.read_text() if p.exists() else "# Benchmarks\n"
    body = f"{SECTION}\n\n{table}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + ("\n" + text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    p.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
