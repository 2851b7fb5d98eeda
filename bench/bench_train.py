"""Training throughput: finrecipe's trainer vs Hugging Face `transformers.Trainer` (`make bench-train`).

CPU mode (default): the same tiny-ish Llama (hidden 256, 4 layers, seq 256, fp32), the same packed
tokens, the same optimizer/schedule/batch/clipping, no checkpoints or evaluation; each contender
runs in its own subprocess, alternating, ``--runs`` times. Throughput = tokens of the steps after
``--skip`` warm-up steps ÷ the wall time between the end of step ``skip`` and the end of the last
step (timestamps taken at step ends by a progress hook / a TrainerCallback), so start-up, model
loading and export are excluded for both. Reported: medians and the ratio ours / HF.

The HF baseline needs `accelerate`, which finrecipe does not depend on: it runs in a separate venv
(``--hf-python``, default ``.venv-bench-train/bin/python`` made with
``python3 -m venv .venv-bench-train && .venv-bench-train/bin/pip install torch transformers accelerate``).

GPU mode (``--gpu``): a ~0.8B Llama-style model (hidden 2048, 16 layers, 32 heads / 8 KV heads,
MLP 5632, vocab 32000) at seq 2048 in bf16 on one GPU with our trainer only: tokens/s and MFU.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "train"


# ------------------------------------------------------------------------------------ setup
def _tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)


def _model(out: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int,
           seq: int, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)
    _tokenizer(out, vocab)


def _corpus(path: Path, n_tokens: int, vocab: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    lines, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(50, 600))
        # Zipf-ish words so that there is something to learn.
        ids = np.minimum(rng.zipf(1.3, n) + 2, vocab - 1)
        lines.append(json.dumps({"text": " ".join(f"w{i}" for i in ids)}))
        total += n + 1
    path.write_text("\n".join(lines) + "\n")


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Model dir, corpus and its packed tokens (via finrecipe's data module, cached)."""
    from transformers import AutoTokenizer

    from finrecipe.train.data import tokenize_pretraining
    from finrecipe.types import DatasetRef

    root = OUT / ("gpu" if args.gpu else "cpu")
    root.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 inter=args.inter, vocab=args.vocab, seq=args.seq)
    tag = "-".join(f"{k}{v}" for k, v in shape.items())
    model_dir = root / f"model-{tag}"
    if not (model_dir / "config.json").exists():
        _model(model_dir, dtype="float32", **shape)  # type: ignore[arg-type]
    need = (args.steps + 1) * args.micro * args.accum * args.seq
    corpus = root / f"corpus-{args.vocab}-{need}.jsonl"
    if not corpus.exists():
        _corpus(corpus, int(need * 1.2), args.vocab)
    tok = AutoTokenizer.from_pretrained(model_dir)
    shard = tokenize_pretraining(DatasetRef("corpus", (corpus,), "jsonl"), tok, root / "cache")
    return {"model_dir": str(model_dir), "corpus": str(corpus), "tokens": str(shard.dir / "tokens.bin"),
            "n_tokens": shard.n_tokens, "root": str(root)}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"seq": args.seq, "micro": args.micro, "accum": args.accum, "steps": args.steps,
            "lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "warmup": 2,
            "grad_clip": 1.0, "threads": args.threads, "skip": args.skip}


def _rate(stamps: list[float], skip: int, tokens_per_step: int) -> float:
    steps = len(stamps) - skip
    return tokens_per_step * steps / (stamps[-1] - stamps[skip - 1])


# ----------------------------------------------------------------------------- contenders
def child_ours(setup_: dict[str, Any], s: dict[str, Any], out: Path, gpu: bool, compile_: bool) -> dict[str, Any]:
    import torch

    from finrecipe.progress import NullProgress
    from finrecipe.stages.base import get_kind
    from finrecipe.types import DatasetRef, ModelRef, StageContext

    if not gpu:
        torch.set_num_threads(s["threads"])
    stamps: list[float] = []

    class Stamp(NullProgress):
        def task(self, description: str, total: float | None = None, unit: str = "it") -> Any:
            class T:
                def update(self, *, completed: float | None = None, **kw: Any) -> None:
                    if unit == "step" and completed:
                        stamps.append(time.perf_counter())

                def __enter__(self) -> T:
                    return self

                def __exit__(self, *a: object) -> None:
                    return None

            return T()

    kind = get_kind("continual_pretraining")
    cfg = kind.Config.model_validate(dict(
        model="m", datasets=["corpus"], seq_len=s["seq"], micro_batch_size=s["micro"], grad_accum=s["accum"],
        max_tokens=s["steps"] * s["micro"] * s["accum"] * s["seq"],
        optimizer=dict(lr=s["lr"], weight_decay=s["weight_decay"], betas=s["betas"], eps=s["eps"]),
        schedule=dict(kind="cosine", warmup_steps=s["warmup"], min_lr_ratio=0.0), grad_clip=s["grad_clip"],
        checkpoint_every_steps=None, seed=0, compile=compile_, device="cuda" if gpu else "cpu",
        packing="stream"))  # the HF Trainer baseline packs one plain stream: compare like with like
    inputs: dict[str, ModelRef | DatasetRef] = {"m": ModelRef("m", Path(setup_["model_dir"])),
              "corpus": DatasetRef("corpus", (Path(setup_["corpus"]),), "jsonl")}
    ctx = StageContext(node="bench", workdir=out, cache_dir=Path(setup_["root"]) / "cache", progress=Stamp())
    res = kind.run(cfg, inputs, out, ctx)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in recs[s["skip"]:] if isinstance(r.get("mfu"), float)]
    tps = _rate(stamps, s["skip"], s["micro"] * s["accum"] * s["seq"])
    return {"tokens_per_s": tps, "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"],
            "mfu": statistics.median(mfus) if mfus else None, "params": res.metrics["params"],
            "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()}


def child_hf(setup_: dict[str, Any], s: dict[str, Any], out: Path) -> dict[str, Any]:
    # Runs in the baseline venv: torch, transformers, accelerate, numpy only.
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(s["threads"])
    seq = s["seq"]
    toks = np.memmap(setup_["tokens"], dtype=np.uint32, mode="r", shape=(setup_["n_tokens"],))
    n_seq = len(toks) // seq

    class Packed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n_seq

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x = torch.from_numpy(np.asarray(toks[i * seq:(i + 1) * seq], dtype=np.int64))
            return {"input_ids": x, "labels": x.clone()}

    stamps: list[float] = []
    losses: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:  # type: ignore[override]
            stamps.append(time.perf_counter())

        def on_log(self, a: Any, state: Any, control: Any, logs: Any = None,  # type: ignore[override]
                   **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    model = AutoModelForCausalLM.from_pretrained(setup_["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=s["micro"], gradient_accumulation_steps=s["accum"],
        max_steps=s["steps"], learning_rate=s["lr"], weight_decay=s["weight_decay"], adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1], adam_epsilon=s["eps"], lr_scheduler_type="cosine", warmup_steps=s["warmup"],
        max_grad_norm=s["grad_clip"], logging_strategy="steps", logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=targs, train_dataset=Packed(), callbacks=[Stamp()])
    trainer.train()
    return {"tokens_per_s": _rate(stamps, s["skip"], s["micro"] * s["accum"] * seq),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "optim": str(targs.optim)}


# ------------------------------------------------------------------------------------ driver
def _spawn(python: str, which: str, payload: dict[str, Any], out: Path) -> dict[str, Any]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "payload.json").write_text(json.dumps(payload))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(payload["settings"]["threads"]))
    p = subprocess.run([python, __file__, "--child", which, "--payload", str(out / "payload.json")],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{p.stderr[-4000:]}")
    return dict(json.loads((out / "result.json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps excluded from the rate")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--compile", action="store_true", help="GPU mode: torch.compile the blocks")
    ap.add_argument("--hf-python", default=str(REPO / ".venv-bench-train" / "bin" / "python"))
    ap.add_argument("--child", choices=["ours", "hf"])
    ap.add_argument("--payload")
    for k, v in dict(hidden=256, layers=4, heads=4, kv_heads=4, inter=688, vocab=4096, seq=256, micro=4,
                     accum=2).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    args = ap.parse_args()

    if args.child:
        payload = json.loads(Path(args.payload).read_text())
        out = Path(args.payload).parent
        if args.child == "ours":
            res = child_ours(payload["setup"], payload["settings"], out, payload["gpu"], payload["compile"])
        else:
            res = child_hf(payload["setup"], payload["settings"], out)
        (out / "result.json").write_text(json.dumps(res))
        return

    if args.gpu:
        # Defaults for the GPU mode unless given: a ~0.8B Llama at seq 2048.
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
        for k, v in dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=5632, vocab=32000, seq=2048,
                         micro=4, accum=1, steps=30, skip=10).items():
            if k not in given:
                setattr(args, k, v)
    if not args.gpu and not Path(args.hf_python).exists():
        raise SystemExit(f"{args.hf_python} not found: the HF Trainer baseline needs accelerate in its own venv: "
                         "python3 -m venv .venv-bench-train && .venv-bench-train/bin/pip install torch "
                         "transformers accelerate numpy (or pass --hf-python)")
    st = setup(args)
    settings = _settings(args)
    payload = {"setup": st, "settings": settings, "gpu": args.gpu, "compile": args.compile}
    root = Path(st["root"])
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "hf": []}
    contenders = ["ours"] if args.gpu else ["ours", "hf"]
    for i in range(args.runs):
        for which in (contenders if i % 2 == 0 else contenders[::-1]):
            python = sys.executable if which == "ours" else args.hf_python
            r = _spawn(python, which, payload, root / f"run-{which}-{i}")
            results[which].append(r)
            print(f"run {i} {which}: {r['tokens_per_s']:,.0f} tok/s"
                  + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""), flush=True)
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items() if v}
    summary = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
               "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "inter", "vocab")},
               "settings": settings, "median_tokens_per_s": med, "runs": results}
    if "hf" in med:
        summary["ratio"] = med["ours"] / med["hf"]
    if args.gpu:
        summary["median_mfu"] = statistics.median(r["mfu"] for r in results["ours"] if r.get("mfu"))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in summary if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
