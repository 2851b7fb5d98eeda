"""Benchmark: finrecipe's scorer vs lm-evaluation-harness 0.4.9 (HF backend) on the same model and data.

    python bench/bench_eval.py [--limit 100] [--runs 3] [--device cpu] [--hidden 256 --layers 4]

1. Builds a small Llama (random weights) with a byte-level BPE tokenizer trained on the task text,
   under bench/out/eval/model.
2. Writes an lm-eval task directory reproducing the jfin `fp2` and `security_sales_1` default prompts
   (description + the rendered question as `doc_to_text`, the choices, the gold index,
   target_delimiter "") and runs lm-eval 0.4.9.1 in its own venv (.venv-lmeval, built on first use as
   `make parity-eval` builds it; `lm_eval` is never installed into .venv) through its Python API,
   logging per-choice log-likelihoods.
3. Runs finrecipe on the same items, checks that acc / acc_norm are identical and the per-choice
   log-likelihoods agree, and times both alternately (after a warm-up run of each, model loading
   excluded); reports the medians and their ratio as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "eval"
LMEVAL_PY = ROOT / ".venv-lmeval" / "bin" / "python"
VERSION = "default"
DATA = Path(os.environ.get("JFIN_DATA", "/work/shared/data/japanese-lm-fin-harness"))
TASKS = ("fp2", "security_sales_1")  # the lm-eval task names below assume these two

_LMEVAL_DRIVER = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model_dir, task_dir, out_path, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
device, batch = sys.argv[6], int(sys.argv[7])
lm = HFLM(pretrained=model_dir, device=device, batch_size=batch,
          dtype="float32" if device == "cpu" else "bfloat16")
tm = TaskManager(include_path=task_dir)
tasks = ["bench_fp2", "bench_security_sales_1"]
times = []
res = None
for i in range(reps + 1):
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=0, log_samples=True,
                          bootstrap_iters=0)
    if i > 0:
        times.append(time.perf_counter() - t0)
out = {"times": times, "metrics": {}, "lls": {}}
for t in tasks:
    r = res["results"][t]
    out["metrics"][t] = {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]}
    samples = sorted(res["samples"][t], key=lambda s: s["doc_id"])
    out["lls"][t] = [[float(x[0][0]) for x in s["resps"]] for s in samples]
json.dump(out, open(out_path, "w"))
'''

_FINRECIPE_DRIVER = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from finrecipe.eval.lm import HFLM
from finrecipe.eval.mc import MCItem, mc_metrics, score_items
from finrecipe.eval.model import load_model
model_dir, items_path, out_path, reps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
device = sys.argv[6]
model, tok = load_model(model_dir, device=device, dtype="float32" if device == "cpu" else "bfloat16")
lm = HFLM(model, tok)
data = json.load(open(items_path))
times, result = [], None
for i in range(reps + 1):
    t0 = time.perf_counter()
    result = {}
    for t, rows in data.items():
        items = [MCItem(r["description"] + r["text"], r["choices"], r["gold"], "") for r in rows]
        lls = score_items(lm, items)
        m = mc_metrics(items, lls)
        result[t] = {"acc": m["acc"], "acc_norm": m["acc_norm"], "lls": lls}
    if device != "cpu":
        torch.cuda.synchronize()
    if i > 0:
        times.append(time.perf_counter() - t0)
out = {"times": times, "metrics": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"]} for t, r in result.items()},
       "lls": {t: r["lls"] for t, r in result.items()}}
json.dump(out, open(out_path, "w"))
'''


def build_inputs(limit: int | None, hidden: int, layers: int, vocab: int,
                 model_vocab: int) -> tuple[Path, Path, Path, int]:
    from finrecipe.eval.tasks import jfin
    from finrecipe.eval.tiny import build_tiny_llama

    OUT.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    texts: list[str] = []
    for t in TASKS:
        docs = jfin.load_docs(t, DATA)
        texts += [d["question"] + d["context"] for d in docs]
        docs = docs[:limit] if limit else docs
        p = jfin.get_prompt(t, VERSION)
        rows[t] = [{"description": p.description, "text": p.doc_to_text(d), "choices": p.doc_to_choice(d),
                    "gold": p.gold(d)} for d in docs]
    model_dir = OUT / f"model-h{hidden}-l{layers}-v{vocab}-mv{model_vocab}"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, texts, vocab_size=vocab, hidden=hidden, layers=layers, heads=4,
                         max_positions=2048, model_vocab=model_vocab)
    items = OUT / "items.json"
    items.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    task_dir = OUT / "lmeval_tasks"
    task_dir.mkdir(exist_ok=True)
    n = 0
    for t, rs in rows.items():
        n += len(rs)
        data_file = task_dir / f"{t}.jsonl"
        with data_file.open("w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps({"text": r["text"], "choices": r["choices"], "gold": r["gold"]},
                                   ensure_ascii=False) + "\n")
        desc = json.dumps(rs[0]["description"], ensure_ascii=False)
        (task_dir / f"bench_{t}.yaml").write_text(
            f"task: bench_{t}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            f"description: {desc}\n"
            "doc_to_text: text\n"
            "doc_to_choice: choices\n"
            "doc_to_target: gold\n"
            'target_delimiter: ""\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
            encoding="utf-8")
    return model_dir, items, task_dir, n


def run(cmd: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
        raise SystemExit(f"failed: {' '.join(cmd[:3])} ...")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--version", default="default",
                    help="jfin prompt version (default: one-token choices; 0.3: the choice texts)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per contender (1: stable on a shared VM; see BENCHMARKS.md)")
    ap.add_argument("--batch", type=int, default=16, help="lm-eval batch size")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary trained on the task text")
    ap.add_argument("--model-vocab", type=int, default=32000,
                    help="output-layer rows (padded beyond the tokenizer, as real models have)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from parity_eval import ensure_lmeval  # the one .venv-lmeval (lm-eval 0.4.9.1), built once

    ensure_lmeval()
    global VERSION
    VERSION = args.version
    model_dir, items, task_dir, n_items = build_inputs(args.limit, args.hidden, args.layers, args.vocab,
                                                          args.model_vocab)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(OUT / "hf_datasets_cache"))
    lm_times: list[float] = []
    fr_times: list[float] = []
    lm_out = fr_out = None
    for i in range(args.runs):
        lo = OUT / f"lmeval_{i}.json"
        fo = OUT / f"finrecipe_{i}.json"
        run([str(LMEVAL_PY), "-c", _LMEVAL_DRIVER, str(model_dir), str(task_dir), str(lo), "1",
             str(args.threads), args.device, str(args.batch)], env)
        run([sys.executable, "-c", _FINRECIPE_DRIVER, str(model_dir), str(items), str(fo), "1",
             str(args.threads), args.device], env)
        lm_out = json.loads(lo.read_text())
        fr_out = json.loads(fo.read_text())
        lm_times += lm_out["times"]
        fr_times += fr_out["times"]
    assert lm_out and fr_out
    max_diff = 0.0
    argmax_same = True
    for t in TASKS:
        a, b = lm_out["lls"][f"bench_{t}"], fr_out["lls"][t]
        for x, y in zip(a, b, strict=True):
            max_diff = max(max_diff, max(abs(p - q) for p, q in zip(x, y, strict=True)))
            argmax_same &= x.index(max(x)) == y.index(max(y))
    lm_med, fr_med = statistics.median(lm_times), statistics.median(fr_times)
    lines = [
        f"Machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, device {args.device}, "
        f"{args.threads} torch threads; date {time.strftime('%Y-%m-%d', time.gmtime())}.",
        f"Model: random Llama hidden {args.hidden}, {args.layers} layers, BPE vocab {args.vocab} "
        f"(output layer {max(args.vocab, args.model_vocab)} rows); "
        f"tasks fp2 + security_sales_1 (prompt {args.version}), first {args.limit} items each = {n_items} questions.",
        "",
        "| contender | acc fp2 | acc_norm fp2 | acc security_sales_1 | acc_norm security_sales_1 | median s | questions/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o, med, key in ((f"lm-eval 0.4.9 hf (batch {args.batch})", lm_out, lm_med, "bench_"),
                              ("finrecipe", fr_out, fr_med, "")):
        m = o["metrics"]
        lines.append(f"| {name} | {m[key + 'fp2']['acc']:.4f} | {m[key + 'fp2']['acc_norm']:.4f} | "
                     f"{m[key + 'security_sales_1']['acc']:.4f} | {m[key + 'security_sales_1']['acc_norm']:.4f} | "
                     f"{med:.2f} | {n_items / med:.1f} |")
    lines += ["", f"Speed-up (ratio of medians, {args.runs} alternating runs each): **{lm_med / fr_med:.2f}×**; "
              f"max |Δ log-likelihood| per choice {max_diff:.2e}; same argmax on every question: {argmax_same}."]
    print("\n".join(lines))
    (OUT / f"result-{args.version}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
