"""Instruction following: greedy generation with the model's chat template, outputs saved, and an
optional judge through an OpenAI-compatible endpoint (pfmt-bench-fin-ja style scores 1–10).

Prompt files: JSONL with ``{"prompt": "..."}`` per line (or ``{"question": ...}``), or a ``.txt``
file with one prompt per line. Without ``judge`` the stage saves outputs and notes that no judge was
configured (no score). The judge gets the question and the answer and must reply with a score; the
first integer 1–10 after "評価" / "score" (or the first integer 1–10 at all) is taken.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finrecipe.errors import DataError, FinrecipeError
from finrecipe.progress import NullProgress, Progress

JUDGE_PROMPT = (
    "あなたは金融分野の専門家として、AIアシスタントの回答の質を評価します。"
    "有用性、正確性、指示への従い方、日本語の自然さを考慮し、1から10の整数で採点してください。"
    "最後に必ず「評価: [[N]]」の形式で点数を書いてください。\n\n"
    "[質問]\n{question}\n\n[回答]\n{answer}\n"
)


def apply_chat(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """(text, whether special tokens are already in it)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return str(text), True
    return prompt, False


def greedy_generate(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 64,
                    stop: list[str] | None = None, chat: bool = False, batch_size: int = 16,
                    progress: Progress | None = None) -> list[str]:
    """Greedy continuations, cut at the first stop string. Prompts are batched (left padding, sorted
    by length); `batch_size=1` runs them one at a time."""
    import torch

    from finrecipe.eval.tasks.custom import cut_at_stop

    progress = progress or NullProgress()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        pad = 0
    encoded: list[list[int]] = []
    for p in prompts:
        text, special = apply_chat(tokenizer, p) if chat else (p, False)
        encoded.append(list(tokenizer(text, add_special_tokens=not special)["input_ids"]))
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outs = [""] * len(prompts)
    with progress.task("generate", total=len(prompts)) as task, torch.inference_mode():
        for b0 in range(0, len(order), max(1, batch_size)):
            idx = order[b0:b0 + max(1, batch_size)]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                n = len(encoded[i])
                ids[r, width - n:] = torch.tensor(encoded[i])
                att[r, width - n:] = 1
            gen = model.generate(ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
            for r, i in enumerate(idx):
                new = gen[r, width:].tolist()
                if eos is not None and eos in new:
                    new = new[:new.index(eos)]
                outs[i] = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop or [])
            task.update(advance=len(idx))
    return outs


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prompt file not found")
    if p.suffix == ".txt":
        prompts = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        from finrecipe.eval.tasks.custom import read_jsonl

        prompts = []
        for i, row in enumerate(read_jsonl(p), 1):
            q = row.get("prompt", row.get("question"))
            if not isinstance(q, str):
                raise DataError(f"{p}:{i}: need a 'prompt' string")
            prompts.append(q)
    if not prompts:
        raise DataError(f"{p}: no prompts")
    return prompts[:limit] if limit else prompts


def parse_score(text: str) -> int | None:
    m = re.search(r"\[\[\s*(10|[1-9])\s*\]\]", text)
    if m:
        return int(m.group(1))
    m = re.search(r"(?:評価|score|Score|点数)\s*[:：]?\s*(10|[1-9])\b", text)
    if m:
        return int(m.group(1))
    m = re.search(r"\b(10|[1-9])\b", text)
    return int(m.group(1)) if m else None


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"),
                                 headers={"Content-Type": "application/json", **headers}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (user-configured endpoint)
        return dict(json.loads(r.read().decode("utf-8")))


def judge_scores(questions: list[str], answers: list[str], *, url: str, model: str,
                 api_key_env: str | None = None, timeout: float = 120.0,
                 post: Callable[[str, dict[str, Any], dict[str, str], float], dict[str, Any]] | None = None
                 ) -> list[int | None]:
    """Ask an OpenAI-compatible chat endpoint (`url` ending in /v1) to score each answer 1–10."""
    post = post or _post_json
    endpoint = url.rstrip("/") + "/chat/completions"
    headers = {}
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise FinrecipeError(f"judge: environment variable {api_key_env} is not set")
        headers["Authorization"] = f"Bearer {key}"
    scores: list[int | None] = []
    for q, a in zip(questions, answers, strict=True):
        body = {"model": model, "temperature": 0,
                "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question=q, answer=a)}]}
        try:
            resp = post(endpoint, body, headers, timeout)
            content = resp["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as e:
            raise FinrecipeError(f"judge at {endpoint} failed: {e}; check judge.url / judge.model") from None
        scores.append(parse_score(str(content)))
    return scores


def run_generation(model: Any, tokenizer: Any, prompts_file: str | Path, *, out_file: str | Path,
                   max_new_tokens: int = 256, judge: dict[str, Any] | None = None, limit: int | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    prompts = read_prompts(prompts_file, limit)
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=True,
                              progress=progress)
    scores: list[int | None] = [None] * len(prompts)
    note = None
    if judge:
        scores = judge_scores(prompts, outputs, url=judge["url"], model=judge["model"],
                              api_key_env=judge.get("api_key_env"))
    else:
        note = "no judge configured (judge: {url, model}); outputs saved without scores"
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps({"prompt": p, "output": o, "score": s}, ensure_ascii=False) + "\n"
                           for p, o, s in zip(prompts, outputs, scores, strict=True)), encoding="utf-8")
    tmp.replace(out)
    valid = [s for s in scores if s is not None]
    from finrecipe.eval.scoring import mean_stderr

    return {"metric": "judge_score", "value": (sum(valid) / len(valid)) if valid else None,
            "stderr": mean_stderr([float(s) for s in valid]), "n": len(prompts), "higher_is_better": True,
            "note": note, "outputs": str(out)}
