"""Tokenizer merges, finrecipe vs mergekit 0.1.5: `tokenizer_source: union` on three models whose
vocabularies differ (end to end, both CLIs, alternating runs, medians).

    .venv/bin/python bench/bench_tokenizer.py [--vocab 32000] [--hidden 512] [--runs 3]

Models (built once under bench/out/tokenizer/): llama, 2 layers, bf16; word-level tokenizers:
base `vocab` words, instruct = base + 2 special tokens, cpt = base's first 94% of words + 6% words of
its own, in another order. The union has vocab + 6% + 2 tokens. mergekit runs from .venv-mergekit
(make parity installs it). Prints one line per run, the parity verdict of the last outputs (bench/parity/
check.py) and the medians; note the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "tokenizer"


def build(out: Path, vocab: int, hidden: int) -> dict[str, Path]:
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    marker = out / f"built-{vocab}-{hidden}"
    names = {v: out / v for v in ("base", "instruct", "cpt")}
    if marker.is_file():
        return names
    shutil.rmtree(out, ignore_errors=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]
    keep = int(vocab * 0.94)
    cpt = words[:3] + list(reversed(words[3:keep])) + [f"fin{i}" for i in range(vocab - keep)]
    specs = {"base": (words, []), "instruct": (words, ["<|im_start|>", "<|im_end|>"]), "cpt": (cpt, [])}
    g = torch.Generator().manual_seed(0)
    for v, (plain, added) in specs.items():
        n = len(plain) + len(added)
        cfg = LlamaConfig(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.to(torch.bfloat16).save_pretrained(names[v])
        tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(plain)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        if added:
            fast.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in added]})
        fast.save_pretrained(str(names[v]))
    marker.write_text("ok")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    mk = ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"
    if not mk.exists():
        print("needs .venv-mergekit (make parity installs it)", file=sys.stderr)
        return 2
    names = build(OUT / "models", a.vocab, a.hidden)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(names["base"]), "dtype": "bfloat16",
           "tokenizer_source": "union",
           "models": [{"model": str(names["instruct"]), "parameters": {"weight": 0.6}},
                      {"model": str(names["cpt"]), "parameters": {"weight": 0.4}}]}
    conf = OUT / "union.yml"
    conf.write_text(json.dumps(cfg, indent=2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmds = {"finrecipe": [str(ROOT / ".venv" / "bin" / "finrecipe"), "merge", str(conf), str(OUT / "fr"),
                          "--overwrite", "-q"],
            "mergekit": [str(mk), str(conf), str(OUT / "mk"), "--quiet", "--no-write-model-card"]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(a.runs):
        for name, cmd in cmds.items():
            shutil.rmtree(OUT / "mk", ignore_errors=True)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            times[name].append(dt)
            print(f"run {i} {name:9s} {dt:6.2f} s  load {os.getloadavg()[0]:.2f}", flush=True)
    sys.path.insert(0, str(ROOT / "bench" / "parity"))
    from check import compare  # the parity harness's verdict on the last pair of outputs

    verdict = compare(cfg, "exact", OUT / "fr", OUT / "mk")
    print(f"parity of the outputs: {verdict.verdict} ({verdict.differing} differing elements; {verdict.detail})")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"union of {a.vocab}-word vocabularies, hidden {a.hidden}: median finrecipe {med['finrecipe']:.2f} s, "
          f"mergekit {med['mergekit']:.2f} s, ratio {med['mergekit'] / med['finrecipe']:.2f}x "
          f"(load {os.getloadavg()[0]:.2f}, {os.cpu_count()} cpus)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
