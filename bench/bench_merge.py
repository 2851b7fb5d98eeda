"""Merge core vs mergekit, one row per merge method: wall time, peak anonymous memory, parity.

    python bench/bench_merge.py                        # every method, ~0.8B bf16 Llama trio
    python bench/bench_merge.py --methods ties,slerp   # some methods (rows of others are kept)
    python bench/bench_merge.py --small --no-write     # quick: hidden 1024, 4 layers

The methods are those finrecipe implements at run time (`finrecipe.merge.METHODS` and the Rust
core's `kernels()`), in the method table's order; the newest (sce, nuslerp, multislerp,
arcee_fusion) run last. Each method has a representative mergekit config (REPRESENTATIVE below;
dtype float32, out_dtype bfloat16) that both tools run from the same file; where finrecipe refuses
the preferred config by name (validated before any run), the next candidate is used and the row
says so. mergekit 0.1.5 runs from its own venv (.venv-mergekit, shared with `make parity`).

For each method: mergekit and finrecipe run alternately (--runs each; mergekit --mergekit-runs,
and only once when its first run takes longer than --mergekit-slow seconds), the 1-minute load
average is recorded before every run, times are medians, the I/O floor is measured (read every
input byte once + write the output size once with fsync), the last outputs are compared tensor
by tensor, the outputs are deleted, and the row is saved to bench/results/bench_merge.json (rows of
methods not run this time are kept, so methods can be rerun one by one, e.g. at a lower load). With --reuse-mergekit, a method whose
saved row has the same config keeps that row's mergekit runs and parity cell and runs only finrecipe
(for a change to finrecipe alone; the table marks such rows with †).
The table of all saved rows is written into the merge section of BENCHMARKS.md.

Targets (issue 10): every method at least 10x faster than mergekit (TIES 25x) with peak anonymous
memory at most 512 MiB. Parity: bit identity for deterministic methods; for top-k methods the
differing elements whose |delta| sits on a tie at a selection boundary are counted (their order is
arbitrary in mergekit); randomised methods (DARE, DELLA) draw their masks differently by design,
so no bit identity is expected or reported (`make parity` checks them by decomposition).

Peak anonymous memory: a sampler thread reads RssAnon from /proc/PID/status of the process and
all its descendants every 10 ms and keeps the largest sum. Memory-mapped input pages are
file-backed (RssFile) and are not counted: they belong to the page cache, not the process.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
MAKE_MODELS = ROOT.parent / "shared" / "tools" / "make_models.py"
BENCH_VENV = ROOT / ".venv-mergekit"  # shared with bench/parity (make parity)
FINRECIPE = ROOT / ".venv" / "bin" / "finrecipe"
# The saved rows (every run's times, loads, memory and parity cell) are kept in the repository, so
# that the table in BENCHMARKS.md can be regenerated (`--render`) and a row rerun in a fresh clone.
STORE = ROOT / "bench" / "results" / "bench_merge.json"


def log(msg: str) -> None:
    print(f"[bench-merge {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- process tree memory sampling ---------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured_rc(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, str]:
    """Run `cmd`; return (wall seconds, peak RssAnon bytes summed over the process tree, exit code,
    the output's last 4000 characters)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            pids, stack = [], [proc.pid]
            while stack:
                p = stack.pop()
                pids.append(p)
                stack += _children(p)
            peak = max(peak, sum(_rss_anon_kb(p) for p in pids))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    return wall, peak * 1024, proc.returncode, out.decode(errors="replace")[-4000:]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RssAnon bytes of the process tree); exit if it fails."""
    wall, peak, rc, out = run_measured_rc(cmd, env)
    if rc != 0:
        sys.stderr.write(out)
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}")
    return wall, peak


# -- setup ----------------------------------------------------------------------------------------------

def ensure_models(small: bool) -> Path:
    d = OUT / ("models-small" if small else "models")
    if (d / "cpt" / "model.safetensors.index.json").is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    args = ["--hidden", "1024", "--layers", "4"] if small else ["--hidden", "2048", "--layers", "16"]
    log(f"building models into {d} ({' '.join(args)})")
    subprocess.run([sys.executable, str(MAKE_MODELS), str(d), *args], check=True)
    return d


def ensure_mergekit() -> Path:
    """mergekit-yaml from the parity harness's venv (.venv-mergekit: the pinned mergekit 0.1.5, torch
    reused from the project venv), so the bench and `make parity` measure the same mergekit."""
    sys.path.insert(0, str(ROOT / "bench" / "parity"))
    from run import ensure_mergekit as ensure_parity_venv

    ensure_parity_venv()
    return BENCH_VENV / "bin" / "mergekit-yaml"


def mergekit_version() -> str:
    r = subprocess.run([str(BENCH_VENV / "bin" / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                       capture_output=True, text=True)
    v = r.stdout.split()
    return f"mergekit {v[0]} (torch {v[1]})" if len(v) == 2 else "mergekit ?"


# -- the method matrix ----------------------------------------------------------------------------------

# Randomised methods: mergekit draws its keep-masks from torch's global RNG, finrecipe from a generator
# keyed by (seed, tensor, element), so their outputs differ by design and no bit identity is reported.
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
# Top-k methods of the task-arithmetic family: (sparsification, consensus), as the parity checker models
# them; their differing elements are tested for ties at a selection boundary.
TOPK = {"ties": "magnitude", "breadcrumbs": "outliers", "breadcrumbs_ties": "outliers"}
# Run last: the methods another change is adding now (their rows appear as soon as finrecipe has them).
LAST = ("sce", "nuslerp", "multislerp", "arcee_fusion")
TARGET_SPEEDUP = {"ties": 25.0}  # issue 10; every other method 10x
DEFAULT_SPEEDUP = 10.0
MEM_LIMIT = 512 * 2**20


def representative(models: Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per method: candidate (label, mergekit config) pairs, preferred first. Models are the trio's
    base (B), instruct (INS) and cpt (C); every config computes in float32 and writes bfloat16."""
    B, INS, C = (str(models / n) for n in ("base", "instruct", "cpt"))

    def m(path: str, **params: Any) -> dict[str, Any]:
        return {"model": path, "parameters": params} if params else {"model": path}

    def c(method: str, models_: list[dict[str, Any]], base: str | None = B, **params: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"merge_method": method}
        if base:
            d["base_model"] = base
        if params:
            d["parameters"] = params
        d["models"] = models_
        d["dtype"], d["out_dtype"] = "float32", "bfloat16"
        return d

    gta2 = [m(INS, weight=1.0, density=0.5), m(C, weight=1.0, density=0.5)]
    crumbs = [m(INS, weight=1.0, density=0.7, gamma=0.05), m(C, weight=1.0, density=0.6, gamma=0.02)]
    della2 = [m(INS, weight=1.0, density=0.5, epsilon=0.1), m(C, weight=1.0, density=0.5, epsilon=0.1)]
    return {
        "linear": [("weights 0.5/0.5", c("linear", [m(INS, weight=0.5), m(C, weight=0.5)], base=None))],
        "task_arithmetic": [("weights 1/1", c("task_arithmetic", [m(INS, weight=1.0), m(C, weight=1.0)]))],
        "ties": [("density 0.5/0.5", c("ties", gta2))],
        "dare_linear": [("density 0.5/0.5", c("dare_linear", gta2))],
        "dare_ties": [("density 0.5/0.5", c("dare_ties", gta2))],
        "breadcrumbs": [("density 0.7/0.6, gamma 0.05/0.02", c("breadcrumbs", crumbs))],
        "breadcrumbs_ties": [("density 0.7/0.6, gamma 0.05/0.02", c("breadcrumbs_ties", crumbs))],
        "della": [("density 0.5, epsilon 0.1", c("della", della2))],
        "della_linear": [("density 0.5, epsilon 0.1", c("della_linear", della2))],
        "slerp": [("base↔instruct, t 0.5", c("slerp", [m(B), m(INS)], t=0.5))],
        "model_stock": [("instruct, cpt", c("model_stock", [m(INS), m(C)]))],
        "passthrough": [("instruct", c("passthrough", [m(INS)], base=None))],
        "nearswap": [("instruct, t 0.001", c("nearswap", [m(INS)], t=0.001))],
        "ram": [("epsilon 1e-3", c("ram", [m(INS), m(C)], epsilon=1e-3))],
        "ramplus_tl": [("epsilon 1e-3, r 0.2, alpha 0.5", c("ramplus_tl", [m(INS), m(C)], epsilon=1e-3, r=0.2,
                                                           alpha=0.5))],
        "karcher": [("base, instruct, cpt", c("karcher", [m(B), m(INS), m(C)], base=None))],
        "sce": [("select_topk 0.5", c("sce", [m(INS), m(C)], select_topk=0.5)),
                ("select_topk 1", c("sce", [m(INS), m(C)]))],
        "nuslerp": [("weights 0.5/0.5, with base", c("nuslerp", [m(INS, weight=0.5), m(C, weight=0.5)]))],
        "multislerp": [("weights 1/1, with base", c("multislerp", [m(INS, weight=1.0), m(C, weight=1.0)]))],
        "arcee_fusion": [("instruct onto base", c("arcee_fusion", [m(INS)]))],
    }


def tree_state() -> str:
    """git HEAD and how many files under rust/ and python/finrecipe/ have uncommitted changes."""
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "rust", "python/finrecipe"],
                           capture_output=True, text=True).stdout.splitlines()
    n = len([x for x in dirty if x.strip()])
    return f"git {git_head()}" + (f" + uncommitted changes in {n} files under rust/ and python/finrecipe/" if n else "")


def snapshot() -> tuple[Path, str]:
    """A copy of the python package as it is now, with the installed Rust core, so that edits others
    make in a shared working tree while the bench runs do not change what it measures.
    Returns (the copy's python directory, a description)."""
    d = OUT / f"snapshot-{os.getpid()}"  # one per bench process; removed when it ends
    shutil.rmtree(d, ignore_errors=True)
    atexit.register(shutil.rmtree, d, True)
    src = ROOT / "python" / "finrecipe"
    shutil.copytree(src, d / "python" / "finrecipe", ignore=shutil.ignore_patterns("__pycache__"))
    cores = sorted(src.glob("_core*.so"))
    built = max((so.stat().st_mtime for so in cores), default=0.0)
    return d / "python", (f"{tree_state()}, copied at {dt.datetime.now(dt.timezone.utc):%H:%M} UTC with the "
                          f"core built at {dt.datetime.fromtimestamp(built, dt.timezone.utc):%H:%M} UTC")


def finrecipe_methods() -> list[str]:
    """The methods finrecipe implements now: its method table and the Rust core's kernels."""
    try:
        from finrecipe import _core
        from finrecipe.merge.methods import METHODS
    except Exception as e:  # noqa: BLE001 - e.g. a method table ahead of the compiled core
        raise SystemExit(f"cannot import finrecipe's merge methods: {e}") from e

    names = list(METHODS)
    names += [k["name"] for k in _core.kernels() if k["name"] not in names]
    return [n for n in names if n not in LAST] + [n for n in LAST if n in names]


def refusal(cfg_path: Path) -> str | None:
    """None when finrecipe accepts the config (validated against the models' headers, no data read),
    else its one-line error."""
    from finrecipe.merge import load_merge_config, validate_merge

    try:
        validate_merge(load_merge_config(cfg_path))
    except Exception as e:  # noqa: BLE001 - any refusal is reported, with its type
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def choose_config(method: str, cands: list[tuple[str, dict[str, Any]]], d: Path) -> tuple[str, Path, str | None]:
    """The first candidate finrecipe accepts, written into `d`: (label, config path, why the preferred
    one was not used)."""
    d.mkdir(parents=True, exist_ok=True)
    first_refusal = None
    for i, (label, cfg) in enumerate(cands):
        path = d / f"{method}.yml"
        path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML; both tools read it
        why = refusal(path)
        if why is None:
            return label, path, (f"{cands[0][0]} refused by finrecipe ({first_refusal})" if i else None)
        log(f"{method}: finrecipe refuses '{label}': {why}")
        first_refusal = first_refusal or why
    raise RuntimeError(f"finrecipe refuses every representative config of {method}: {first_refusal}")


def input_files(models: Path) -> list[Path]:
    return sorted(p for n in ("base", "instruct", "cpt") for p in (models / n).glob("*.safetensors"))


def io_floor(models: Path, out_bytes: int) -> tuple[float, float]:
    """Seconds to read every input byte once (page cache warm, as for the merges) and to write
    `out_bytes` once with fsync (dd, 16 MiB blocks)."""
    files = input_files(models)
    # untimed: the merges' outputs (mergekit does not sync its own) must not be written back
    # during the floor's write, whose fsync would wait for them too
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    read_s = time.perf_counter() - t0
    target = OUT / "floor.bin"
    count = max(1, out_bytes // (16 << 20))
    # The write is the median of three: on this (virtual) disk a large write now and then takes
    # several times as long as the next one, which a single measurement would report as the floor.
    writes = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fsync"],
                       check=True, capture_output=True)
        writes.append(time.perf_counter() - t0)
        target.unlink()
        os.sync()
    return read_s, statistics.median(writes)


# -- parity ---------------------------------------------------------------------------------------------

def _ordered(x: Any) -> Any:
    """bf16 bit patterns (as int32) mapped to a monotone integer line, so ulp distance = difference."""
    import torch

    b = x.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(b >= 0x8000, -(b - 0x8000), b)  # sign-magnitude -> signed; ±0 both map to 0


def _on_tie(mag: Any, bounds: list[int]) -> Any:
    """Elements of `mag` (flat) whose value's run of equal values straddles a rank boundary b of the
    ascending order (ranks b-1 and b hold the same value): which of them a sort keeps is arbitrary."""
    import torch

    n = mag.numel()
    out = torch.zeros(n, dtype=torch.bool)
    for b in bounds:
        if 0 < b < n:
            v = torch.kthvalue(mag, b).values  # rank b-1 (0-based) of the ascending order
            if int((mag <= v).sum()) > b:  # the run of v reaches rank b too
                out |= mag == v
    return out


def parity(a_dir: Path, b_dir: Path, topk: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare two output directories tensor by tensor (bf16 ulp distance on the bit patterns).
    With `topk` ({"kind": "magnitude"|"outliers", "base": dir, "donors": [(dir, density, gamma)]}),
    also count the differing elements where some donor's |delta| sits on a tie at a boundary of its
    kept ranks (the parity checker's kept_range), whose order mergekit's unstable argsort leaves open."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        return {k: d / "model.safetensors" for k in safe_open(str(d / "model.safetensors"), "pt").keys()}

    ta, tb = tensors(a_dir), tensors(b_dir)
    missing = sorted(set(ta) ^ set(tb))
    total = same = beyond1 = noise = 0
    max_ulp = 0
    worst = ""
    handles: dict[Path, Any] = {}

    def get(p: Path, k: str) -> Any:
        if p not in handles:
            handles[p] = safe_open(str(p), "pt")
        return handles[p].get_tensor(k)

    kept_range: Any = None
    if topk:
        sys.path.insert(0, str(ROOT / "bench" / "parity"))
        import check  # the parity harness's model of the kept ranks

        kept_range = check.kept_range

        base_t = tensors(Path(topk["base"]))
        donors = [(tensors(Path(d)), dens, gam) for d, dens, gam in topk["donors"]]
    diff_total = explained = 0
    for k in sorted(set(ta) & set(tb)):
        x, y = get(ta[k], k), get(tb[k], k)
        if x.dtype != y.dtype or x.shape != y.shape:
            missing.append(f"{k} ({x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)})")
            continue
        if x.dtype == torch.bfloat16:
            differ = (x.view(torch.int16) != y.view(torch.int16)).reshape(-1)  # one pass; ulps only where needed
            d = (_ordered(x.reshape(-1)[differ]) - _ordered(y.reshape(-1)[differ])).abs()
            differ[differ.clone()] = d != 0  # +0 and -0 are the same value (0 ulp)
            d = d[d != 0]
            eq = x.numel() - int(differ.sum())
            far = d > 1
            if bool(far.any()):
                beyond1 += int(far.sum())
                # the parity harness's f32-noise rule: within 2^-20 of the tensor's largest magnitude
                # (where terms cancel to nearly zero, tiny absolute errors are many bf16 ulps)
                xs, ys = x.reshape(-1)[differ][far].double(), y.reshape(-1)[differ][far].double()
                noise += int(((xs - ys).abs() <= 2.0**-20 * float(y.abs().max())).sum())
            m = int(d.max()) if d.numel() else 0
            if topk and kept_range and eq != x.numel():
                base = get(base_t[k], k).float().reshape(-1)
                on_tie = torch.zeros_like(differ)
                for dt, dens, gam in donors:
                    mag = (get(dt[k], k).float().reshape(-1) - base).abs()
                    st, en = kept_range(mag.numel(), dens, gam, topk["kind"])
                    on_tie |= _on_tie(mag, [st, en])
                diff_total += int(differ.sum())
                explained += int((differ & on_tie).sum())
        else:
            eq = int((x == y).sum())
            m = -1 if eq != x.numel() else 0
        total += x.numel()
        same += eq
        if m > max_ulp:
            max_ulp, worst = m, k
    return {"elements": total, "identical": same, "fraction": same / total if total else 0.0,
            "max_ulp": max_ulp, "worst": worst, "beyond_1ulp": beyond1, "noise": noise, "mismatched_names": missing,
            "differing": diff_total, "at_threshold": explained}


def topk_spec(method: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    if method not in TOPK:
        return None
    donors = [(x["model"], float(x["parameters"].get("density", 1.0)), float(x["parameters"].get("gamma", 0.01)))
              for x in cfg["models"] if x["model"] != cfg["base_model"]]
    return {"kind": TOPK[method], "base": cfg["base_model"], "donors": donors}


# -- main -----------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // (1024 * 1024)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB RAM, Linux {platform.release()}"


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def git_head() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def load1() -> float:
    return os.getloadavg()[0]


def bench_method(method: str, cfg_path: Path, label: str, note: str | None, models: Path, mk: Path,
                 a: argparse.Namespace, env: dict[str, str], code: str,
                 reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row. `reuse`: a saved row of the same config whose mergekit runs (times, memory, loads,
    parity cell) are kept; only finrecipe runs (`--reuse-mergekit`)."""
    cfg = json.loads(cfg_path.read_text())
    cfg_sha = hashlib.sha256(cfg_path.read_bytes()).hexdigest()
    outs = {"mergekit": OUT / f"out-mergekit-{method}", "finrecipe": OUT / f"out-finrecipe-{method}"}
    cmds = {
        # mergekit counts parameters per shard, finrecipe bytes: bf16 output = 2 bytes/parameter
        "mergekit": [str(mk), str(cfg_path), str(outs["mergekit"]), "--quiet",
                     "--out-shard-size", str(int(a.out_shard_size) // 2)],
        "finrecipe": [str(FINRECIPE), "merge", str(cfg_path), str(outs["finrecipe"]), "--quiet", "--overwrite",
                      "--out-shard-size", str(a.out_shard_size)],
    }
    times: dict[str, list[float]] = {"mergekit": [], "finrecipe": []}
    # seconds of the `sync` right after each run: writing back what the run left dirty (mergekit does
    # not fsync its output; finrecipe's is on disk when it exits)
    wbs: dict[str, list[float]] = {"mergekit": [], "finrecipe": []}
    mems: dict[str, list[int]] = {"mergekit": [], "finrecipe": []}
    loads: dict[str, list[float]] = {"mergekit": [], "finrecipe": []}
    n_mk = 0 if reuse else a.mergekit_runs if a.mergekit_runs is not None else a.runs
    slow = False
    started = dt.datetime.now(dt.timezone.utc)
    for i in range(max(a.runs, n_mk)):
        for who in ("mergekit", "finrecipe"):
            if (who == "mergekit" and (i >= n_mk or slow)) or (who == "finrecipe" and i >= a.runs):
                continue
            shutil.rmtree(outs[who], ignore_errors=True)
            # Untimed: write back every dirty page (mergekit does not fsync its output, and a deleted
            # output's blocks are discarded), so that no run pays for the previous run's writes.
            os.sync()
            ld = load1()
            wall, peak, rc, out = run_measured_rc(cmds[who], env)
            if rc != 0:
                for o in outs.values():
                    shutil.rmtree(o, ignore_errors=True)
                tail = out.strip().splitlines()[-1] if out.strip() else ""
                raise RuntimeError(f"{who} failed (exit {rc}): {tail}")
            t0 = time.perf_counter()
            os.sync()
            wbs[who].append(time.perf_counter() - t0)
            times[who].append(wall)
            mems[who].append(peak)
            loads[who].append(ld)
            log(f"{method} {who} run {i + 1}: {wall:.2f}s (+ {wbs[who][-1]:.2f}s write-back), peak anon "
                f"{peak / 2**20:.0f} MiB, load before {ld:.2f}")
            if who == "mergekit" and i == 0 and wall > a.mergekit_slow and n_mk > 1:
                slow = True
                log(f"{method}: mergekit took {wall:.0f}s > {a.mergekit_slow:.0f}s: no further mergekit runs")
    out_bytes = dir_bytes(outs["finrecipe"])
    r_s, w_s = io_floor(models, out_bytes)
    floor = r_s + w_s
    par: dict[str, Any] | None
    if reuse:
        par = reuse["parity"]
        times["mergekit"], mems["mergekit"] = reuse["all"]["mergekit"], [reuse["mk_mem"]]
        wbs["mergekit"] = reuse.get("writeback", {}).get("mergekit", [])
        loads["mergekit"], slow = reuse["loads"]["mergekit"], reuse["mk_slow"]
        log(f"{method}: floor {floor:.2f}s; mergekit's runs and parity cell reused from {reuse['date']}")
    elif method in RANDOM:
        par = None
        log(f"{method}: floor {floor:.2f}s; parity not compared (random masks)")
    else:
        par = parity(outs["mergekit"], outs["finrecipe"], topk_spec(method, cfg))
        log(f"{method}: floor {floor:.2f}s (read {r_s:.2f} + write {w_s:.2f}); parity {par['fraction']:.6%} "
            f"identical, max {par['max_ulp']} ulp ({par['worst']}); at a top-k tie {par['at_threshold']:,} "
            f"of {par['differing']:,}")
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    mk_t, fr_t = statistics.median(times["mergekit"]), statistics.median(times["finrecipe"])
    target = TARGET_SPEEDUP.get(method, DEFAULT_SPEEDUP)
    durable = None
    if all(len(wbs[w]) == len(times[w]) for w in wbs):
        durable = (statistics.median(t + b for t, b in zip(times["mergekit"], wbs["mergekit"], strict=True))
                   / statistics.median(t + b for t, b in zip(times["finrecipe"], wbs["finrecipe"], strict=True)))
    return {"method": method, "config": label, "config_note": note, "mk": mk_t, "fr": fr_t,
            "speedup": mk_t / fr_t, "speedup_durable": durable, "writeback": wbs, "target": target,
            "mk_mem": max(mems["mergekit"]),
            "fr_mem": max(mems["finrecipe"]), "floor": floor, "floor_synced": True, "read": r_s, "write": w_s,
            "parity": par,
            "runs": (len(times["mergekit"]), len(times["finrecipe"])), "mk_slow": slow, "all": times,
            "loads": loads, "out_bytes": out_bytes, "date": f"{started:%Y-%m-%d %H:%M}",
            "commit": git_head(), "code": code, "small": a.small, "cfg_sha": cfg_sha,
            "mk_reused": (reuse.get("mk_reused") or reuse["date"]) if reuse else None, "synced": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true",
                    help="hidden 1024, 4 layers (quick check; its rows are kept apart and never written to "
                         "BENCHMARKS.md)")
    ap.add_argument("--runs", type=int, default=3, help="finrecipe runs per method (alternating with mergekit's)")
    ap.add_argument("--mergekit-runs", type=int, default=None, help="mergekit runs per method (default: --runs)")
    ap.add_argument("--mergekit-slow", type=float, default=90.0,
                    help="seconds: when mergekit's first run of a method takes longer, it runs only once "
                         "(the table says so)")
    ap.add_argument("--methods", default="all",
                    help="comma-separated methods, or 'all' (every method finrecipe implements)")
    ap.add_argument("--fresh", action="store_true", help="forget saved rows of methods not run this time")
    ap.add_argument("--out-shard-size", type=int, default=5_000_000_000,
                    help="output shard budget in bytes (mergekit is given the same as bf16 parameters)")
    ap.add_argument("--reuse-mergekit", action="store_true",
                    help="for methods with a saved row of the same config, keep that row's mergekit runs "
                         "(times, memory, loads) and its parity cell and run only finrecipe (when only "
                         "finrecipe changed; the table marks such rows)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: write the table of the saved rows (bench/results/bench_merge.json)")
    ap.add_argument("--snapshot", action="store_true",
                    help="run finrecipe from a copy of the python package and the Rust core as they are at the "
                         "start (for a working tree others edit while the bench runs)")
    a = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if a.snapshot:
        pkg, code = snapshot()
        sys.path.insert(0, str(pkg))
        env["PYTHONPATH"] = str(pkg)
    else:
        code = f"the working tree ({tree_state()})"
    # finrecipe's modules byte-compiled, as an installed package has them (pip compiles mergekit's at
    # install; an editable checkout under PYTHONDONTWRITEBYTECODE would recompile every module on
    # every start, about 50 ms a run)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg / "finrecipe") if a.snapshot
                    else str(ROOT / "python" / "finrecipe")], check=True, stdout=subprocess.DEVNULL)
    log(f"finrecipe: {code}")
    implemented = finrecipe_methods()
    methods = [] if a.render else implemented if a.methods == "all" else [x.strip() for x in a.methods.split(",") if x.strip()]
    unknown = [x for x in methods if x not in implemented]
    if unknown:
        raise SystemExit(f"not a finrecipe merge method: {', '.join(unknown)} (implemented: {', '.join(implemented)})")
    store = OUT / "bench_merge-small.json" if a.small else STORE
    if a.render:
        # the table from the saved rows alone (no models built, no mergekit venv needed): each row
        # carries the machine, mergekit's version and the input size it was measured with
        if not _load_store(store).get("rows"):
            raise SystemExit(f"no saved rows in {store}: run the bench first")
        models = OUT / ("models-small" if a.small else "models")
        publish(store, implemented, models, None, representative(models), a)
        return
    models = ensure_models(a.small)
    reps = representative(models)
    no_config = [x for x in methods if x not in reps]
    if no_config:
        raise SystemExit(f"no representative config in bench_merge.py for: {', '.join(no_config)}; add one to "
                         "representative()")
    need = 2 * sum(f.stat().st_size for f in input_files(models)) // 3 + (1 << 30)
    free = shutil.disk_usage(OUT).free
    if free < 2 * need:
        raise SystemExit(f"{free / 2**30:.1f} GiB free under {OUT}; two outputs need about {need / 2**30:.1f} "
                         "GiB each: free some space first")
    mk = ensure_mergekit()
    store.parent.mkdir(parents=True, exist_ok=True)
    saved = {} if a.fresh else _load_store(store)
    if a.fresh:
        with _store_lock(store):
            store.write_text(json.dumps({"rows": {}, "failed": {}}, indent=2))
    rows: dict[str, Any] = saved.get("rows", {})
    failed: dict[str, str] = saved.get("failed", {})
    in_bytes = sum(f.stat().st_size for f in input_files(models))
    measured_on = {"in_bytes": in_bytes, "machine": machine(), "mk_version": mergekit_version()}
    log(f"inputs: {in_bytes / 1e9:.2f} GB in {len(input_files(models))} files; methods: {', '.join(methods)}; "
        f"load {load1():.2f}")
    for method in methods:
        try:
            label, cfg_path, note = choose_config(method, reps[method], OUT / ("configs-small" if a.small else "configs"))
            old = rows.get(method) if a.reuse_mergekit else None
            if old is not None and (old.get("config") != label or old.get("cfg_sha") not in (
                    None, hashlib.sha256(cfg_path.read_bytes()).hexdigest())):
                log(f"{method}: saved row's config differs; mergekit runs again")
                old = None
            row: dict[str, Any] | None = {
                **bench_method(method, cfg_path, label, note, models, mk, a, env, code, old), **measured_on}
            err = None
        except RuntimeError as e:
            log(f"{method}: {e}")
            row, err = None, str(e)
        # Another bench run (another method) may have saved rows meanwhile: merge into what is on
        # disk now, under a lock, instead of writing back the copy read at the start.
        with _store_lock(store):
            cur = _load_store(store)
            rows, failed = cur.get("rows", {}), cur.get("failed", {})
            if row is not None:
                rows[method] = row
                failed.pop(method, None)
            else:
                failed[method] = err or "failed"
                rows.pop(method, None)
            store.write_text(json.dumps({"rows": rows, "failed": failed}, indent=2, default=str))
    publish(store, implemented, models, in_bytes, reps, a)


def publish(store: Path, implemented: list[str], models: Path, in_bytes: int | None, reps: dict[str, Any],
            a: argparse.Namespace) -> None:
    """Print the table of the rows saved in `store` (as they are on disk now: other bench runs may have
    added rows) and, unless --no-write or --small, write it into BENCHMARKS.md."""
    with _store_lock(store):
        cur = _load_store(store)
    rows, failed = cur.get("rows", {}), cur.get("failed", {})
    order = implemented + [x for x in rows if x not in implemented]
    text = render([rows[x] for x in order if x in rows], failed, implemented, models, in_bytes, reps)
    print(text)
    if not a.no_write and not a.small:
        with _store_lock(store):
            update_benchmarks(text)
        log("BENCHMARKS.md updated")


@contextlib.contextmanager
def _store_lock(store: Path):
    """An exclusive lock beside the saved rows, so that bench runs of different methods started at
    the same time (one per terminal) do not overwrite each other's rows."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{store.stem}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_store(store: Path) -> dict[str, Any]:
    if not store.is_file():
        return {}
    try:
        saved = json.loads(store.read_text())
    except json.JSONDecodeError:
        return {}
    return saved if isinstance(saved, dict) and "rows" in saved else {}


def _fmt_load(xs: list[float]) -> str:
    if not xs:
        return "–"
    lo, hi = min(xs), max(xs)
    return f"{lo:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}"


def _parity_cell(r: dict[str, Any]) -> str:
    p = r["parity"]
    if p is None:
        return "n/a (random masks)"
    cell = f"{p['fraction'] * 100:.4f}%, max {p['max_ulp']} ulp"
    if p.get("beyond_1ulp") and not p.get("differing"):
        cell += f" ({p['beyond_1ulp']:,} elements > 1 ulp"
        if "noise" in p:  # rows measured before this count existed do not have it
            cell += f", {p['noise']:,} of them within 2^-20 of the tensor's largest magnitude"
        cell += ")"
    if p.get("differing"):
        cell += f"; {p['at_threshold'] / p['differing'] * 100:.2f}% of the differing on a top-k tie"
    if p.get("mismatched_names"):
        cell += f"; {len(p['mismatched_names'])} tensors differ in name/shape/dtype"
    return cell


def render(rows: list[dict[str, Any]], failed: dict[str, str], implemented: list[str], models: Path,
           in_bytes: int | None, reps: dict[str, Any]) -> str:
    """The table of saved rows. Machine, mergekit version and input size come from the rows (as measured);
    rows saved before they carried them fall back to this machine, this mergekit venv and `in_bytes`."""
    size = "hidden 2048, 16 layers, ~0.84B params" if "small" not in models.name else "small: hidden 1024, 4 layers"
    dates = sorted(r["date"] for r in rows)
    codes = sorted({r.get("code", r["commit"]) for r in rows})
    machines = sorted({r["machine"] for r in rows if r.get("machine")}) or [machine()]
    mk_vers = sorted({r["mk_version"] for r in rows if r.get("mk_version")}) or [mergekit_version()]
    sizes = sorted({r["in_bytes"] for r in rows if r.get("in_bytes")}) or ([in_bytes] if in_bytes else [])
    in_text = " / ".join(f"{b / 1e9:.2f} GB" for b in sizes) or "? GB"
    lines = [
        f"Machine: {'; '.join(machines)}, shared with other engineers' jobs (the load average before each run is in the "
        f"table). Rows started between {dates[0] if dates else '?'} and {dates[-1] if dates else '?'} UTC; finrecipe: "
        f"{'; '.join(codes)}. {'; '.join(mk_vers)}, CPU. Command: `make bench-merge` "
        "(`python bench/bench_merge.py`; a row can be rerun alone with `--methods NAME`).",
        "",
        f"Inputs: bf16 Llama trio (base, instruct, cpt; {size}, from `../shared/tools/make_models.py`), "
        f"{in_text} in total, page cache warm. Both tools run the same config file per method "
        "(dtype float32, out_dtype bfloat16), alternating; times are medians of wall time including process "
        "start-up. `mergekit-yaml CONFIG OUT --quiet --out-shard-size N/2` (its defaults otherwise; it counts "
        "parameters per shard) vs `finrecipe merge CONFIG OUT --quiet --out-shard-size N` (bytes; all cores); "
        "N = 5 GB, so both write one shard. The runs column gives (mergekit, finrecipe) runs: where mergekit ran "
        "once (it takes minutes per method on a loaded machine; `--mergekit-runs`, or automatically when its "
        "first run takes longer than `--mergekit-slow`, 90 s), its one time is set against finrecipe's median. "
        "The load is the 1-minute average read before each run, so a finrecipe run that follows a mergekit run "
        "sees part of mergekit's own load.",
        "",
        "| method | config | mergekit | finrecipe | runs | speed-up (target) | speed-up to a durable output | "
        "peak anon mergekit | peak anon finrecipe (≤ 512 MiB) | finrecipe / I/O floor | load before runs | "
        "bit-identical with mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp_ok = r["speedup"] >= r["target"]
        mem_ok = r["fr_mem"] <= MEM_LIMIT
        ld = _fmt_load(r["loads"]["mergekit"] + r["loads"]["finrecipe"])
        lines.append(
            f"| {r['method']}{' ‡' if r.get('synced') else ''} | {r['config']} | {r['mk']:.2f} s{' †' if r.get('mk_reused') else ''} | "
            f"{r['fr']:.2f} s | {r['runs'][0]}, {r['runs'][1]} | "
            f"{r['speedup']:.1f}× (≥ {r['target']:.0f}×: {'met' if sp_ok else '**NOT met**'}) | "
            f"{'–' if r.get('speedup_durable') is None else format(r['speedup_durable'], '.1f') + '×'} | "
            f"{r['mk_mem'] / 2**20:.0f} MiB | {r['fr_mem'] / 2**20:.0f} MiB ({'met' if mem_ok else '**NOT met**'}) | "
            f"{r['fr'] / r['floor']:.2f}×{'' if r.get('floor_synced') else ' °'} | {ld} | {_parity_cell(r)} |")
    for mth, why in failed.items():
        lines.append(f"| {mth} | – | – | – | – | failed: {why} | – | – | – | – | – | – |")
    missing = [x for x in reps if x not in implemented]
    not_run = [x for x in implemented if x not in {r["method"] for r in rows} and x not in failed]
    n_sp = sum(r["speedup"] >= r["target"] for r in rows)
    n_mem = sum(r["fr_mem"] <= MEM_LIMIT for r in rows)
    lines += [
        "",
        f"- Targets (issue 10): speed-up met by {n_sp} of {len(rows)} methods"
        + (" (not met: " + ", ".join(f"{r['method']} {r['speedup']:.1f}× of {r['target']:.0f}×" for r in rows
                                     if r["speedup"] < r["target"]) + ")" if n_sp < len(rows) else "")
        + f"; peak anonymous memory ≤ 512 MiB met by {n_mem} of {len(rows)}"
        + (f" (largest {max(r['fr_mem'] for r in rows) / 2**20:.0f} MiB)" if rows else "") + ".",
        "- † mergekit's runs (times, memory, loads) and the parity cell come from that row's earlier "
        "measurement (`--reuse-mergekit`: same config, only finrecipe changed and rerun): "
        + (", ".join(f"{r['method']} from {r['mk_reused']}" for r in rows if r.get("mk_reused")) or "none")
        + ".",
        "- Bit identity is reported for deterministic methods. DARE and DELLA draw random keep-masks: "
        "mergekit from torch's global RNG, finrecipe from a generator keyed by (seed, tensor, element), so "
        "their outputs differ by design (`make parity` checks them by decomposition: kept fractions within "
        "binomial bounds and exact rescaling). For top-k methods (TIES, breadcrumbs) the cell gives the share "
        "of differing elements where some donor's |δ| sits on a tie at a boundary of its kept ranks: mergekit "
        "picks among such equal magnitudes by an unstable argsort, so no independent implementation matches "
        "it there (`make parity` proves each such element).",
        "- Runs marked ‡ were measured with `sync` (untimed) before every run, so that no run pays for "
        "writing back the previous run's output (mergekit leaves its output unsynced in the page cache; "
        "finrecipe fsyncs its own). Unmarked rows were measured before this was added.",
        "- Speed-up to a durable output: each run's wall time plus the `sync` timed right after it (the "
        "write-back of what the run left in the page cache; mergekit does not fsync its output, finrecipe's is "
        "on disk when it exits, so its `sync` finds next to nothing), medians of those sums; the same work on "
        "both sides (the target column does not count mergekit's write-back). – where a row was measured "
        "before this was recorded.",
        "- I/O floor = reading every input byte once (warm page cache, 16 MiB reads) + writing the output "
        "size once with `dd bs=16M conv=fsync` after an untimed `sync` (the median of three writes; "
        "finrecipe fsyncs its output, mergekit does not); ° marks a floor measured before that sync was added, which also waited for the write-back of "
        "the merges' outputs and is too high; below 1× "
        "means finrecipe overlaps reading, computing and writing.",
        "- Peak anonymous memory: RssAnon of the process tree sampled every 10 ms from /proc/PID/status "
        "(memory-mapped model files are file-backed and not counted; a spike shorter than 10 ms can be missed).",
        "- Config notes: " + ("; ".join(f"{r['method']}: {r['config_note']}" for r in rows if r.get("config_note"))
                              or "every method ran its preferred config") + ".",
    ]
    if missing:
        lines.append("- mergekit methods finrecipe does not implement yet (no row): " + ", ".join(missing) + ".")
    if not_run:
        lines.append("- Implemented but not measured yet: " + ", ".join(not_run) + ".")
    lines.append("- All runs (s, with the load before each): " + "; ".join(
        f"{r['method']} mergekit " + ", ".join(f"{t:.1f} ({ld:.1f})" for t, ld in
                                               zip(r["all"]["mergekit"], r["loads"]["mergekit"], strict=True))
        + " / finrecipe " + ", ".join(f"{t:.2f} ({ld:.1f})" for t, ld in
                                      zip(r["all"]["finrecipe"], r["loads"]["finrecipe"], strict=True))
        for r in rows) + ".")
    return "\n".join(lines) + "\n"


def update_benchmarks(text: str) -> None:
    """Replace the generated part of the merge section: from its heading up to its first `###`
    subsection (hand-written analysis and earlier measurements, which are kept) or the next section."""
    p = ROOT / "BENCHMARKS.md"
    s = p.read_text()
    head = "## Merge core vs mergekit (`make bench-merge`)"
    start = s.index(head) + len(head)
    nxt = s.find("\n## ", start)
    end = nxt if nxt != -1 else len(s)
    sub = s.find("\n### ", start, end)
    if sub != -1:
        end = sub
    p.write_text(s[:start] + "\n\n" + text + s[end:])


if __name__ == "__main__":
    main()
