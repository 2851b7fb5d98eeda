"""Merge search vs the loop a user would write today: the same trials, the same scores, wall time.

    python bench/bench_search.py                  # 16 trials of a ~50M-parameter bf16 Llama trio
    python bench/bench_search.py --small --repeats 1 --trials 4   # a quick check

Contenders (run alternately, `--repeats` times each, on the same models and development data):

- **finrecipe**: `finrecipe.search.run_search` (what a `merge_search` stage runs) in one process
  (imports included, as `finrecipe apply` pays them once): one model load,
  the development data tokenized once, each candidate merged into the loaded weights (task
  arithmetic and TIES in memory), scored, cached (a fresh trial cache per run).
- **loop**: for each candidate, `finrecipe merge cfg.yml out/` as its own process (the Rust core,
  writing the merge to disk), then a separate evaluation process that loads the merged model
  and computes the same two numbers (bits per byte on the held-out text, log-likelihood of the
  instruct responses) with the same batched scorer: the loop pays for processes, disk and model
  loads, not for a slower scorer.

Both produce the same numbers: the instruct model's own scores (the agreement reference), the fixed
1.0/1.0 task-arithmetic merge's (the reference a search reports; the loop merges and scores it as
its first candidate) and every candidate's. The instruct responses are generated once beforehand
and given to both (not timed). The candidates are `strategy: random` draws (seed 0) over
task_arithmetic and TIES. Torch runs with `--torch-threads` (default 1: the development machine is
shared, and two torch threads per process slow both contenders down when other work runs); the
Rust core's merges (the loop's `finrecipe merge`, finrecipe's in-place kernel) use every core. The table (median wall times,
the ratio, per-trial medians, the largest score difference, machine load) goes into the
merge-search section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "search"
MAKE_MODELS = ROOT.parent / "shared" / "tools" / "make_models.py"
PY = sys.executable
FINRECIPE = str(Path(PY).parent / "finrecipe")
SECTION = "## Merge search (`make bench-search`)"


def log(msg: str) -> None:
    print(f"[bench-search {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- inputs ------------------------------------------------------------------------------------------

def build_trio(small: bool) -> dict[str, Path]:
    """base / instruct / cpt from make_models.py (random bf16, real layout) plus a word-level tokenizer."""
    hidden, layers, vocab = (256, 4, 4000) if small else (512, 12, 16000)
    d = OUT / f"trio-h{hidden}-l{layers}-v{vocab}"
    if not (d / "cpt" / "tokenizer.json").is_file():
        if d.exists():
            shutil.rmtree(d)
        subprocess.run([PY, str(MAKE_MODELS), str(d), "--hidden", str(hidden), "--layers", str(layers),
                        "--vocab", str(vocab), "--shard-gb", "1"], check=True)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
        tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        for n in ("base", "instruct", "cpt"):
            fast.save_pretrained(d / n)
            (d / n / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return {n: d / n for n in ("base", "instruct", "cpt")}


def dev_data(vocab: int, docs: int, words: int, prompts: int) -> tuple[list[str], list[str]]:
    rng = random.Random(0)
    texts = [" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(words)) for _ in range(docs)]
    ps = [" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(12)) for _ in range(prompts)]
    return texts, ps


# -- the loop a user writes today -------------------------------------------------------------------

def eval_one(model_dir: str, data_file: str, out_file: str) -> None:
    """The loop's evaluation process: load the merged model from disk, score the dev data."""
    import torch

    from finrecipe.eval.model import load_model
    from finrecipe.eval.scoring import model_max_length
    from finrecipe.search.objective import response_items, rolling_items, score_items

    d = json.loads(Path(data_file).read_text())
    torch.set_grad_enabled(False)
    model, tok = load_model(model_dir, device="cpu", dtype="float32")
    L = model_max_length(model, tok)
    items = rolling_items(tok, d["texts"], min(L, d["max_length"]))
    ll, _, _ = score_items(model, items, pad_id=2)
    nbytes = sum(len(t.encode()) for t in d["texts"])
    rl, rn, _ = score_items(model, response_items(d["responses"], min(L, d["max_length"])), pad_id=2)
    import math

    Path(out_file).write_text(json.dumps({"bits_per_byte": -ll / (math.log(2) * nbytes),
                                          "response_logprob": rl / max(rn, 1)}))


def run_loop(trio: dict[str, Path], cands: list[Any], data_file: Path, work: Path) -> tuple[float, list[dict[str, Any]],
                                                                                            list[float]]:
    import yaml

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out: list[dict[str, Any]] = []
    per: list[float] = []
    t0 = time.monotonic()
    # the reference: the instruct model's own log-likelihood of its responses
    subprocess.run([PY, __file__, "--eval-one", str(trio["instruct"]), str(data_file), str(work / "instruct.json")],
                   check=True)
    inst = json.loads((work / "instruct.json").read_text())
    for i, c in enumerate(cands):  # cands[0]: the fixed 1.0/1.0 merge, which finrecipe scores too
        ts = time.monotonic()
        cfg = c.merge_config(str(trio["base"]), dtype="float32")
        cfg["models"] = [{**m, "model": str(trio["instruct"] if m["model"] == "instruct" else trio["cpt"])}
                         for m in cfg["models"]]
        (work / f"c{i}.yml").write_text(yaml.safe_dump(cfg))
        subprocess.run([FINRECIPE, "merge", "-q", str(work / f"c{i}.yml"), str(work / f"m{i}")], check=True)
        subprocess.run([PY, __file__, "--eval-one", str(work / f"m{i}"), str(data_file), str(work / f"s{i}.json")],
                       check=True)
        s = json.loads((work / f"s{i}.json").read_text())
        import math

        s["agreement"] = math.exp(s["response_logprob"] - inst["response_logprob"])
        out.append(s)
        shutil.rmtree(work / f"m{i}")  # a user keeps disk use bounded too
        per.append(time.monotonic() - ts)
    return time.monotonic() - t0, out, per


# -- finrecipe ----------------------------------------------------------------------------------------

def fin_one(spec_file: str, out_file: str) -> None:
    """The finrecipe contender as its own process (so it pays its imports once, as `apply` does)."""
    from finrecipe.search.objective import InstructionObjective, SelectRule
    from finrecipe.search.runner import SearchSetup, run_search
    from finrecipe.search.space import SearchSpace

    d = json.loads(Path(spec_file).read_text())
    kw = dict(d["setup"])
    kw["paths"] = {k: Path(v) for k, v in kw["paths"].items()}
    kw["space"] = SearchSpace.model_validate(kw["space"])
    kw["instruction"] = InstructionObjective.model_validate(kw["instruction"])
    kw["rule"] = SelectRule.model_validate(kw["rule"])
    res = run_search(SearchSetup(cache_dir=Path(d["cache_dir"]), **kw))
    Path(out_file).write_text(json.dumps({"trials": [{"key": t.candidate.key, **t.scores.to_json(),
                                                      "seconds": t.seconds} for t in res.trials],
                                          "fixed": [{"key": t.candidate.key, **t.scores.to_json(),
                                                     "seconds": t.seconds} for t in res.fixed],
                                          "instruct_seconds": res.instruct.seconds,
                                          "search_seconds": res.seconds}))


def run_finrecipe(setup_kw: dict[str, Any], work: Path) -> tuple[float, dict[str, Any]]:
    if work.exists():
        shutil.rmtree(work)  # a fresh trial cache: every trial runs
    work.mkdir(parents=True)
    kw = dict(setup_kw)
    kw["paths"] = {k: str(v) for k, v in kw["paths"].items()}
    for k in ("space", "instruction", "rule"):
        kw[k] = kw[k].model_dump(mode="json")
    (work / "spec.json").write_text(json.dumps({"setup": kw, "cache_dir": str(work / "cache")}))
    t0 = time.monotonic()
    subprocess.run([PY, __file__, "--fin-one", str(work / "spec.json"), str(work / "out.json")], check=True)
    return time.monotonic() - t0, json.loads((work / "out.json").read_text())


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--words", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--methods", default="task_arithmetic,ties", help="comma list of the methods searched")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="OMP_NUM_THREADS of both contenders' torch (0: torch's default); the merge core's "
                         "threads are its own")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--eval-one", nargs=3, metavar=("MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--fin-one", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.eval_one:
        eval_one(*a.eval_one)
        return 0
    if a.fin_one:
        fin_one(*a.fin_one)
        return 0
    if a.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(a.torch_threads)  # inherited by both contenders' processes

    from finrecipe.eval.model import load_model
    from finrecipe.search.objective import InstructionObjective, SelectRule, generate_responses
    from finrecipe.search.space import SearchSpace, fixed_candidate
    from finrecipe.search.strategy import candidates_of

    trio = build_trio(a.small)
    cfg = json.loads((trio["base"] / "config.json").read_text())
    from finrecipe.merge import read_model

    n_params = read_model(trio["base"]).num_params
    texts, prompts = dev_data(cfg["vocab_size"], a.docs, a.words, a.prompts)
    max_length = 256
    OUT.mkdir(parents=True, exist_ok=True)
    # the instruct responses, once (not timed), given to both contenders
    model, tok = load_model(trio["instruct"], device="cpu", dtype="float32")
    responses = generate_responses(model, tok, prompts, max_new_tokens=16, chat=True)
    del model
    space = SearchSpace.model_validate({"methods": a.methods.split(","),
                                        "weights": {"instruct": [0.5, 1.5], "cpt": [0.5, 1.5]},
                                        "density": [0.3, 0.9]})
    cands = list(candidates_of("random", space, "instruct", ["cpt"], a.trials, 0))
    # finrecipe's search also scores the fixed 1.0/1.0 merge (the reference of its report): the
    # loop merges and scores it too, so both produce the same numbers
    fixed = fixed_candidate("instruct", "cpt")
    loop_cands = [fixed, *cands]
    ins = InstructionObjective(prompts="bench", max_new_tokens=16, chat=True)
    setup_kw = dict(base="base", instruct="instruct", domains=["cpt"], paths=dict(trio), space=space,
                    strategy="random", trials=a.trials, seed=0, domain_texts=texts, prompts=prompts,
                    instruction=ins, rule=SelectRule(rule="constrained", min_agreement=0.9),
                    model_keys={n: n for n in trio}, max_length=max_length, device="cpu", responses=responses)
    data_file = OUT / "dev.json"
    data_file.write_text(json.dumps({"texts": texts, "responses": responses, "max_length": max_length}))
    n_ta = sum(1 for c in cands if c.method == "task_arithmetic")
    log(f"trio {trio['base'].parent.name}: {n_params / 1e6:.1f}M parameters; {len(cands)} candidates "
        f"({n_ta} task_arithmetic, {len(cands) - n_ta} ties); dev: {a.docs} docs x {a.words} words, "
        f"{a.prompts} prompts; load {loadavg()}")

    fin_t: list[float] = []
    loop_t: list[float] = []
    loads: list[str] = []
    fin_res: dict[str, Any] = {}
    loop_scores: list[dict[str, Any]] = []
    fin_per: dict[str, list[float]] = {}  # candidate key -> seconds per repeat
    loop_per: dict[str, list[float]] = {}
    fin_fixed_costs: list[float] = []  # whole process minus the trials (start, load, instruct, fixed)
    for r in range(a.repeats):
        loads.append(loadavg())
        t, fin_res = run_finrecipe(setup_kw, OUT / "fin")
        fin_t.append(t)
        for tr in [*fin_res["trials"], *fin_res["fixed"]]:
            fin_per.setdefault(tr["key"], []).append(tr["seconds"])
        fin_fixed_costs.append(t - sum(tr["seconds"] for tr in fin_res["trials"]))
        log(f"repeat {r + 1}: finrecipe {t:.1f} s, of which outside the search trials {fin_fixed_costs[-1]:.1f} s "
            f"(instruct scored in {fin_res['instruct_seconds']:.1f} s, fixed merge "
            f"{fin_res['fixed'][0]['seconds']:.1f} s; load {loads[-1]})")
        loads.append(loadavg())
        t, scores, per = run_loop(trio, loop_cands, data_file, OUT / "loop")
        loop_t.append(t)
        loop_fixed = scores[0]
        loop_scores = scores[1:]
        for c, x in zip(loop_cands, per, strict=True):
            loop_per.setdefault(c.key, []).append(x)
        log(f"repeat {r + 1}: loop {t:.1f} s (load {loads[-1]})")
    by_key = {t["key"]: t for t in fin_res["trials"]}
    by_key.update({t["key"]: t for t in fin_res["fixed"]})
    pairs = [(fixed, loop_fixed), *zip(cands, loop_scores, strict=True)]
    d_bpb = max(abs(by_key[c.key]["bits_per_byte"] - s["bits_per_byte"]) for c, s in pairs)
    d_agr = max(abs((by_key[c.key]["agreement"] or 0) - s["agreement"]) for c, s in pairs)
    med_f, med_l = statistics.median(fin_t), statistics.median(loop_t)
    ratio = med_l / med_f

    def per_trial(which: dict[str, list[float]], method: str | None = None) -> float:
        """Median over the search trials (each a median over the repeats)."""
        return statistics.median(statistics.median(which[c.key]) for c in cands if method in (None, c.method))

    pf, pl = per_trial(fin_per), per_trial(loop_per)
    log(f"median finrecipe {med_f:.1f} s, loop {med_l:.1f} s: {ratio:.1f}x; per trial {pf:.2f} s vs {pl:.2f} s "
        f"({pl / pf:.1f}x); max |d bits/byte| {d_bpb:.2e}, max |d agreement| {d_agr:.2e}")
    by_method = []
    for method in sorted({c.method for c in cands}):
        f_m, l_m = per_trial(fin_per, method), per_trial(loop_per, method)
        by_method.append(f"{'TA' if method == 'task_arithmetic' else method.upper()} {f_m:.2f} / {l_m:.2f} "
                         f"({l_m / f_m:.1f}x)")
        log(f"  {method}: per trial median {f_m:.2f} s (finrecipe) vs {l_m:.2f} s (loop): {l_m / f_m:.1f}x")
    row = (f"| {dt.date.today()} | {trio['base'].parent.name} ({n_params / 1e6:.0f}M, bf16) | {len(cands)} "
           f"({n_ta} TA / {len(cands) - n_ta} TIES) + fixed | {a.docs}x{a.words} words, {a.prompts} prompts | "
           f"{med_f:.1f} | {med_l:.1f} | **{ratio:.1f}x** | {pf:.2f} / {pl:.2f} ({pl / pf:.1f}x; "
           f"{', '.join(by_method)}) | {d_bpb:.1e} / {d_agr:.1e} | {a.repeats} | {a.torch_threads or 'default'} | "
           f"{', '.join(loads)} |")
    log(f"row: {row}")
    if a.no_write:
        return 0
    write_section(row, platform.processor() or platform.machine(), os.cpu_count() or 0)
    return 0


def write_section(row: str, cpu: str, cores: int) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    head = (f"{SECTION}\n\n"
            "The same candidates scored by `run_search` (one model load, trials merged into the loaded weights) "
            "and by the loop a user writes today (`finrecipe merge` per trial to disk, then a separate "
            "evaluation process per candidate with the same scorer; both also score the instruct model and the "
            "fixed 1.0/1.0 merge). Wall time of the whole search "
            "(median over alternating runs), per-trial medians (finrecipe / loop), the largest difference of "
            "any trial's scores between the two (bits per byte / agreement), and the load average "
            f"(1/5/15 min) before each run. Machine: {cores} cores ({cpu}), shared.\n\n"
            "| date | models | trials | dev data | finrecipe s | loop s | ratio | per trial s | max diff | "
            "repeats | torch threads | load |\n|---|---|---|---|---:|---:|---:|---|---|---:|---|---|\n")
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = len(text) if nxt < 0 else nxt + 1
        lines = text[start:end].split("\n")
        last = max(i for i, ln in enumerate(lines) if ln.startswith("| "))  # the table's last row
        lines.insert(last + 1, row)
        text = text[:start] + "\n".join(lines) + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + head + row + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
