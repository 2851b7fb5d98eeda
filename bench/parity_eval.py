"""jfin parity: the real japanese-lm-fin-harness on lm-evaluation-harness 0.4.9.1 against finrecipe.

    make parity-eval                                   # all 5 tasks × every prompt version
    .venv/bin/python bench/parity_eval.py --limit 20   # a quick look (first 20 documents of each task)

1. lm-evaluation-harness 0.4.9.1 lives in its own venv, .venv-lmeval, with the harness's own pins
   (datasets < 4 for its dataset scripts) and the libraries of its time (transformers < 5; pandas < 3:
   under pandas 3 `astype(str)` keeps NaN, and the harness's cpa_audit script would then put
   "ア: nan" lines into contexts); torch comes from the project venv through a .pth file instead of
   a second download. `lm_eval` is never installed into .venv.
2. The harness itself is cloned at the commit finrecipe's prompts were written against
   (`--harness-git`, default its GitHub repository; a local clone or mirror works too) into
   bench/out/parity-eval/harness and run through its own `main.py` (its TaskManager, its
   process_results patch, its metrics) with `--log_samples`, in float32 on the CPU (or `--device`).
3. Data: the four exam tasks read the files in the harness checkout, by the harness's dataset scripts
   on one side and finrecipe's loaders on the other. chabsa's data (a Kaggle download) cannot be
   fetched here: a synthetic chABSA set (Japanese sentences, targets, polarities incl. neutral) is
   written once in the Kaggle layout for finrecipe and as JSONL for the harness, whose chabsa task
   files are used unchanged through `include:` with only the dataset swapped.
4. Model: a small random Llama with a byte-level BPE tokenizer trained on the tasks' own text
   (`finrecipe.eval.tiny`), so Japanese tokenizes; the point is the plumbing, not the scores.
5. For every task × version: the harness's requests (context, continuation) against finrecipe's
   (prompt identity), per-request log-likelihood differences, argmax flips (acc and acc_norm
   predictions), and whether acc / acc_norm / chabsa f1 and the leaderboard average are equal. The
   table goes into BENCHMARKS.md (`--no-write` to only print it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "parity-eval"
LM_VENV = ROOT / ".venv-lmeval"
LM_REQS = ["lm-eval==0.4.9.1", "datasets>=2.15,<4", "transformers>=4.40,<5", "openpyxl", "pandas<3", "scikit-learn"]
HARNESS_GIT = "https://github.com/pfnet-research/japanese-lm-fin-harness"
SECTION = "## jfin parity with lm-evaluation-harness (`make parity-eval`)"

sys.path.insert(0, str(ROOT / "python"))

from finrecipe.eval.tasks import jfin  # noqa: E402

# The harness's task files per task: version → task name ("default" is the plain task name).
HARNESS_VERSIONS = {t: [v for v in jfin.VERSIONS if not (t == "chabsa" and v in ("0.1.2", "0.2.1"))]
                    for t in jfin.TASKS}


def log(msg: str) -> None:
    print(f"[parity-eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def harness_task(task: str, version: str) -> str:
    name = "chabsa_local" if task == "chabsa" else task
    return name if version == "default" else f"{name}-1.0-{version}"


# ------------------------------------------------------------------------------------ environment

def ensure_lmeval() -> Path:
    py = LM_VENV / "bin" / "python"
    marker = LM_VENV / ".installed"
    want = " ".join(LM_REQS)
    if marker.is_file() and marker.read_text() == want:
        return py
    log(f"installing {LM_REQS[0]} into {LM_VENV.name} (once; torch is reused from the project venv)")
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LM_VENV)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz-finrecipe-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *LM_REQS], check=True)
    marker.write_text(want)
    return py


def ensure_harness(src: str) -> Path:
    d = OUT / "harness"
    if not (d / "main.py").is_file():
        log(f"cloning the harness from {src}")
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["git", "clone", "--quiet", src, str(d)], check=True)
    subprocess.run(["git", "-C", str(d), "checkout", "--quiet", jfin.PINNED_COMMIT], check=True)
    return d


# ------------------------------------------------------------------------------------ synthetic chABSA

_SUBJECTS = ["売上高", "営業利益", "経常利益", "当期純利益", "受注高", "海外事業", "設備投資", "国内市場", "金融収支",
             "個人消費", "原材料価格", "為替相場", "利益率", "主力製品の販売", "不動産事業"]
_PREDICATES = {
    "positive": ["は前年同期比で増加しました", "は堅調に推移いたしました", "は過去最高を更新しました", "が大きく改善しました"],
    "negative": ["は前年同期比で減少しました", "は低調に推移いたしました", "が悪化いたしました", "は大幅な減益となりました"],
    "neutral": ["は前年並みとなりました", "については引き続き注視してまいります"],
}


def ensure_chabsa(harness: Path, n_files: int = 6, per_file: int = 40) -> Path:
    """Synthetic chABSA: `<OUT>/data/chABSA-dataset/*.json` (finrecipe) and `<OUT>/data/chabsa.jsonl`
    (the harness), the same documents in the same order; plus the harness's chabsa task files with
    only the dataset swapped (`include:`)."""
    data = OUT / "data"
    d = data / "chABSA-dataset"
    if not d.is_dir():
        rng = random.Random(0)
        d.mkdir(parents=True)
        for f in range(n_files):
            sentences = []
            for s in range(per_file):
                k = 1 + (rng.random() < 0.3)
                subs = rng.sample(_SUBJECTS, k)
                ops = []
                parts = []
                for sub in subs:
                    pol = rng.choices(["positive", "negative", "neutral"], [0.45, 0.45, 0.1])[0]
                    parts.append(sub + rng.choice(_PREDICATES[pol]))
                    ops.append({"target": sub, "category": "x", "polarity": pol, "from": 0, "to": len(sub)})
                sentences.append({"sentence_id": s, "sentence": "、".join(parts) + "。", "opinions": ops})
            (d / f"e{f:05d}_ann.json").write_text(json.dumps({"header": {"document_id": f"E{f:05d}"},
                                                              "sentences": sentences}, ensure_ascii=False),
                                                  encoding="utf-8")
    docs = jfin.load_docs("chabsa", data)
    jsonl = data / "chabsa.jsonl"
    jsonl.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs), encoding="utf-8")
    tdir = harness / "jlm_fin_eval" / "tasks" / "chabsa"
    for v in HARNESS_VERSIONS["chabsa"]:
        src = "chabsa.yaml" if v == "default" else f"chabsa-1.0-{v}.yaml"
        (tdir / f"{harness_task('chabsa', v)}.yaml").write_text(
            f"include: {src}\ntask: {harness_task('chabsa', v)}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {jsonl}\n", encoding="utf-8")
    return data


def ensure_model(harness: Path, data: Path) -> Path:
    from finrecipe.eval.tiny import build_tiny_llama

    model = OUT / "model"
    if (model / "config.json").is_file():
        return model
    texts: list[str] = []
    for t in jfin.TASKS:
        for doc in jfin.load_docs(t, data if t == "chabsa" else harness):
            p = jfin.get_prompt(t, "0.3")
            texts.append(p.context(doc) + " ".join(p.doc_to_choice(doc)))
    log(f"building the model from {len(texts)} task texts")
    build_tiny_llama(model, texts, vocab_size=8000, hidden=64, layers=2, heads=4, max_positions=4096, seed=0)
    return model


# ------------------------------------------------------------------------------------ the two runs

def run_harness(py: Path, harness: Path, model: Path, limit: int | None, device: str, batch: int) -> Path:
    out = OUT / "lmeval" / (f"limit{limit}" if limit else "full")
    if out.is_dir() and list(out.rglob("results_*.json")):
        log(f"reusing the harness's outputs in {out.relative_to(ROOT)}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    tasks = [harness_task(t, v) for t in jfin.TASKS for v in HARNESS_VERSIONS[t]]
    env = {**os.environ, "HF_DATASETS_TRUST_REMOTE_CODE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(OUT / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(py), "main.py", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--tasks", ",".join(tasks), "--num_fewshot", "0", "--batch_size", str(batch), "--device", device,
           "--output_path", str(out), "--log_samples"]
    if limit:
        cmd += ["--limit", str(limit)]
    log(f"running the harness on {len(tasks)} task files (progress: tail -f {OUT / 'lmeval.log'})")
    t0 = time.perf_counter()
    with open(OUT / "lmeval.log", "w") as logf:
        r = subprocess.run(cmd, cwd=harness, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = (OUT / "lmeval.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"the harness failed (exit {r.returncode}); see {OUT / 'lmeval.log'}:\n{tail}")
    log(f"harness done in {time.perf_counter() - t0:.0f} s")
    return out


def _num(x: Any) -> float:
    while isinstance(x, (list, tuple)):
        x = x[0]
    return float(x)


def _greedy(x: Any) -> bool:
    while isinstance(x, (list, tuple)) and len(x) == 1:
        x = x[0]
    return str(x[1]) == "True" if isinstance(x, (list, tuple)) else False


def read_harness(out: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    results: dict[str, dict[str, Any]] = {}
    for f in out.rglob("results_*.json"):
        results.update(json.loads(f.read_text(encoding="utf-8"))["results"])
    return samples, results


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def compare(harness: Path, data: Path, model: Path, out: Path, limit: int | None, device: str) -> dict[str, Any]:
    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.mc import MCItem, mc_metrics
    from finrecipe.eval.requests import Request

    samples, results = read_harness(out)
    lm = HFLM.load(model, device=device, dtype="float32")
    cells: list[dict[str, Any]] = []
    scores_h: dict[str, dict[str, float | None]] = {}
    scores_f: dict[str, dict[str, float | None]] = {}
    t0 = time.perf_counter()
    for task in jfin.TASKS:
        docs = jfin.load_docs(task, data if task == "chabsa" else harness)
        docs = docs[:limit] if limit else docs
        for v in HARNESS_VERSIONS[task]:
            name = harness_task(task, v)
            rows = samples[name]
            p = jfin.get_prompt(task, v)
            items = [MCItem(p.context(d), p.doc_to_choice(d), p.gold(d), p.target_delimiter) for d in docs]
            reqs = [Request(it.context, it.delimiter + c) for it in items for c in it.choices]
            got = lm.loglikelihood(reqs, description=name)
            assert len(rows) == len(items), f"{name}: harness {len(rows)} documents, finrecipe {len(items)}"
            same_prompt = 0
            n_req = 0
            max_d = 0.0
            greedy_diff = 0
            flips = flips_norm = 0
            k = 0
            lls_f: list[list[float]] = []
            for it, row in zip(items, rows, strict=True):
                args = [(a["arg_0"], a["arg_1"]) for a in row["arguments"].values()] \
                    if isinstance(row["arguments"], dict) else [tuple(a) for a in row["arguments"]]
                mine = [(r.context, r.continuation) for r in reqs[k:k + len(it.choices)]]
                same_prompt += int(args == mine)
                lh = [_num(x) for x in row["resps"]]
                gh = [_greedy(x) for x in row["resps"]]
                lf = [ll for ll, _ in got[k:k + len(it.choices)]]
                gf = [g for _, g in got[k:k + len(it.choices)]]
                lls_f.append(lf)
                n_req += len(lf)
                max_d = max([max_d] + [abs(a - b) for a, b in zip(lh, lf, strict=True)])
                greedy_diff += sum(a != b for a, b in zip(gh, gf, strict=True))
                lens = [float(len(c)) for c in it.choices]
                flips += int(_argmax(lh) != _argmax(lf))
                flips_norm += int(_argmax([a / n for a, n in zip(lh, lens, strict=True)])
                                  != _argmax([a / n for a, n in zip(lf, lens, strict=True)]))
                k += len(it.choices)
            m = mc_metrics(items, lls_f, f1=(task == "chabsa"))
            res = results[name]
            eq = {"acc": res["acc,none"] == m["acc"], "acc_norm": res["acc_norm,none"] == m["acc_norm"]}
            if task == "chabsa":
                eq["f1"] = math.isclose(res["f1,none"], m["f1"], rel_tol=0, abs_tol=1e-12)
            metric = jfin.METRIC[task]
            scores_h.setdefault(v, {})[task] = res[f"{metric},none"]
            scores_f.setdefault(v, {})[task] = m[metric]
            cells.append({"task": task, "version": v, "docs": len(items), "requests": n_req,
                          "prompts_identical": same_prompt, "max_abs_dll": max_d, "greedy_flag_diffs": greedy_diff,
                          "argmax_flips": flips, "argmax_flips_norm": flips_norm, "metrics_equal": eq,
                          "harness": {x: res.get(f"{x},none") for x in ("acc", "acc_norm", "f1")},
                          "finrecipe": {x: m.get(x) for x in ("acc", "acc_norm", "f1")}})
    # chabsa has no 0.1.2 / 0.2.1 task files: the leaderboard uses 0.1 / 0.2 for them (as finrecipe does)
    for alias, real in (("0.1.2", "0.1"), ("0.2.1", "0.2")):
        for s in (scores_h, scores_f):
            if alias in s and real in s and "chabsa" in s[real]:
                s[alias]["chabsa"] = s[real]["chabsa"]
    lb_h, lb_f = jfin.leaderboard(scores_h), jfin.leaderboard(scores_f)
    return {"cells": cells, "finrecipe_seconds": time.perf_counter() - t0,
            "leaderboard": {"harness": {"best_version": lb_h["best_version"], "average": lb_h["average"]},
                            "finrecipe": {"best_version": lb_f["best_version"], "average": lb_f["average"]}}}


# ------------------------------------------------------------------------------------ report

def table(rep: dict[str, Any], limit: int | None, lm_versions: str) -> str:
    cells = rep["cells"]
    n_req = sum(c["requests"] for c in cells)
    n_docs = sum(c["docs"] for c in cells)
    same = sum(c["prompts_identical"] for c in cells)
    flips = sum(c["argmax_flips"] + c["argmax_flips_norm"] for c in cells)
    worst = max(c["max_abs_dll"] for c in cells)
    unequal = [f"{c['task']} {c['version']} {k}" for c in cells for k, ok in c["metrics_equal"].items() if not ok]
    lb = rep["leaderboard"]
    lines = [SECTION, "",
             f"{len(cells)} task × prompt-version files of japanese-lm-fin-harness ({jfin.PINNED_COMMIT}), "
             f"{n_docs} documents{f' (first {limit} of each task)' if limit else ''}, {n_req} requests; "
             f"{lm_versions}; a random 2-layer Llama (hidden 64, byte-level BPE of 8000 trained on the tasks' "
             "text), float32 on the CPU. chabsa: a synthetic chABSA set (the real one is a Kaggle download), "
             "through the harness's own chabsa task files. "
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}.", "",
             f"**Prompts identical: {same} of {n_docs} documents; max |Δ log-likelihood| {worst:.2e}; "
             f"argmax flips (acc + acc_norm predictions): {flips}; metrics not equal: "
             f"{', '.join(unequal) if unequal else 'none'}; leaderboard: harness "
             f"{lb['harness']['average']:.4f} ({lb['harness']['best_version']}), finrecipe "
             f"{lb['finrecipe']['average']:.4f} ({lb['finrecipe']['best_version']}).**", "",
             "| task | version | docs | requests | prompts identical | max \\|Δll\\| | argmax flips (acc / norm) "
             "| is_greedy differs | acc | acc_norm | f1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]

    def eqs(c: dict[str, Any], k: str) -> str:
        if k not in c["metrics_equal"]:
            return "—"
        v = c["finrecipe"][k]
        return ("=" if c["metrics_equal"][k] else "≠ ") + f" {v:.4f}"

    for c in cells:
        lines.append(f"| {c['task']} | {c['version']} | {c['docs']} | {c['requests']} | {c['prompts_identical']} "
                     f"| {c['max_abs_dll']:.1e} | {c['argmax_flips']} / {c['argmax_flips_norm']} "
                     f"| {c['greedy_flag_diffs']} | {eqs(c, 'acc')} | {eqs(c, 'acc_norm')} | {eqs(c, 'f1')} |")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    p = ROOT / "BENCHMARKS.md"
    cur = p.read_text(encoding="utf-8")
    if SECTION in cur:
        a = cur.index(SECTION)
        b = cur.find("\n## ", a + len(SECTION))
        cur = cur[:a] + text + (cur[b + 1:] if b >= 0 else "")
        cur = cur if cur.endswith("\n") else cur + "\n"
    else:
        cur = cur.rstrip("\n") + "\n\n" + text
    p.write_text(cur, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness-git", default=os.environ.get("HARNESS_GIT", HARNESS_GIT))
    ap.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    py = ensure_lmeval()
    harness = ensure_harness(a.harness_git)
    data = ensure_chabsa(harness)
    model = ensure_model(harness, data)
    out = run_harness(py, harness, model, a.limit, a.device, a.batch_size)
    rep = compare(harness, data, model, out, a.limit, a.device)
    (OUT / "report.json").write_text(json.dumps(rep, indent=1, ensure_ascii=False), encoding="utf-8")
    vers = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(', '.join(f'{p} ' + m.version(p) "
                           "for p in ('lm_eval', 'transformers', 'datasets', 'torch')))"],
                          capture_output=True, text=True).stdout.strip()
    text = table(rep, a.limit, vers)
    print(text)
    if not a.no_write:
        write_section(text)
        log("BENCHMARKS.md updated")
    bad = sum(c["argmax_flips"] + c["argmax_flips_norm"] for c in rep["cells"]) or any(
        not ok for c in rep["cells"] for ok in c["metrics_equal"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
