"""Users' own benchmarks, no code needed.

Multiple choice (JSONL, one item per line)::

    {"question": "...", "choices": ["...", "..."], "answer": 1 | "choice text" | "B", "context": "..."}

The context is ``template.format(question=, context=, choices=)`` where ``choices`` is the choices
rendered one per line with ``choice_format`` (``{label}`` = A, B, ..., ``{choice}``, ``{index}``).
Each choice is scored as ``delimiter + choice`` (``score: choice``) or ``delimiter + label``
(``score: label``) with the lm-eval log-likelihood semantics of `finrecipe.eval.scoring`;
metrics acc and acc_norm with standard errors.
Default template: ``"{context}{question}\\n{choices}\\n答え:"`` (``{context}`` is the context plus a
newline when present, else empty).

Generation (JSONL)::

    {"prompt": "...", "answer": "..."}   or   {"prompt": "...", "answers": ["...", "..."]}

The prompt is ``template.format(prompt=...)`` (default ``"{prompt}"``), optionally wrapped in the
model's chat template (``chat: true``); greedy decoding up to ``max_new_tokens``, cut at the first stop
string. Metrics: ``exact_match`` (after normalisation: NFKC, trimmed, lower-cased, whitespace
collapsed) and ``contains`` (a normalised answer occurs in the normalised output). Outputs are saved.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from finrecipe.errors import DataError
from finrecipe.progress import NullProgress, Progress

DEFAULT_MC_TEMPLATE = "{context}{question}\n{choices}\n答え:"


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{i}: each line must be a JSON object")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{p}: no items")
    return rows


def _label(i: int) -> str:
    return chr(65 + i) if i < 26 else str(i)


def render_mc(row: dict[str, Any], *, template: str | None = None, choice_format: str = "{label}. {choice}"
              ) -> tuple[str, list[str], int]:
    """(context, choices, gold index) for one multiple-choice row."""
    choices = [str(c) for c in row["choices"]]
    ans = row["answer"]
    if isinstance(ans, bool) or not isinstance(ans, (int, str)):
        raise DataError(f"answer must be an index or a choice text (got {ans!r})")
    if isinstance(ans, int):
        gold = ans
    elif ans in choices:
        gold = choices.index(ans)
    elif len(ans) == 1 and "A" <= ans <= "Z" and ord(ans) - 65 < len(choices):
        gold = ord(ans) - 65
    else:
        raise DataError(f"answer {ans!r} is neither an index, a choice text nor a choice letter")
    if not 0 <= gold < len(choices):
        raise DataError(f"answer index {gold} out of range for {len(choices)} choices")
    ctx = row.get("context") or ""
    rendered = "\n".join(choice_format.format(label=_label(i), choice=c, index=i) for i, c in enumerate(choices))
    text = (template or DEFAULT_MC_TEMPLATE).format(
        question=row["question"], context=(ctx + "\n") if ctx and template is None else ctx, choices=rendered)
    return text, choices, gold


def evaluate_multiple_choice(scorer: Any, path: str | Path, *, template: str | None = None, delimiter: str = " ",
                             choice_format: str = "{label}. {choice}", score: str = "choice",
                             limit: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    from finrecipe.eval.runner import MCItem, mc_metrics, score_items

    rows = read_jsonl(path, limit)
    items = []
    for i, row in enumerate(rows, 1):
        for k in ("question", "choices", "answer"):
            if k not in row:
                raise DataError(f"{path}:{i}: missing field {k!r} (need question, choices, answer)")
        try:
            text, choices, gold = render_mc(row, template=template, choice_format=choice_format)
        except DataError as e:
            raise DataError(f"{path}:{i}: {e}") from None
        except (KeyError, IndexError) as e:
            raise DataError(f"{path}:{i}: template placeholder {e} unknown; use {{question}}, {{context}}, "
                            "{choices}") from None
        if score == "label":
            choices = [_label(j) for j in range(len(choices))]
        items.append(MCItem(text, choices, gold, delimiter))
    lls = score_items(scorer, items, progress, f"custom {Path(path).name}")
    m = mc_metrics(items, lls)
    return {"metric": "acc", "value": m["acc"], "stderr": m["acc_stderr"], "n": len(items),
            "higher_is_better": True, "metrics": {k: v for k, v in m.items() if k != "predictions"}}


def normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip().lower()
    return re.sub(r"\s+", " ", s)


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


def evaluate_generation(model: Any, tokenizer: Any, path: str | Path, *, template: str | None = None,
                        max_new_tokens: int = 64, stop: list[str] | None = None, chat: bool = False,
                        limit: int | None = None, out_file: str | Path | None = None,
                        progress: Progress | None = None) -> dict[str, Any]:
    from finrecipe.eval.generate import greedy_generate

    progress = progress or NullProgress()
    rows = read_jsonl(path, limit)
    prompts: list[str] = []
    golds: list[list[str]] = []
    for i, row in enumerate(rows, 1):
        if "prompt" not in row or not ("answer" in row or "answers" in row):
            raise DataError(f"{path}:{i}: need 'prompt' and 'answer' (or 'answers')")
        answers = row.get("answers", [row.get("answer")])
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{path}:{i}: 'answers' must be a non-empty list")
        try:
            prompts.append((template or "{prompt}").format(prompt=row["prompt"]))
        except (KeyError, IndexError) as e:
            raise DataError(f"{path}:{i}: template placeholder {e} unknown; use {{prompt}}") from None
        golds.append([str(a) for a in answers])
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop or [],
                              chat=chat, progress=progress)
    em: list[float] = []
    contains: list[float] = []
    records = []
    for p, g, o in zip(prompts, golds, outputs, strict=True):
        no = normalize(o)
        hit = 1.0 if any(no == normalize(a) for a in g) else 0.0
        inside = 1.0 if any(normalize(a) and normalize(a) in no for a in g) else 0.0
        em.append(hit)
        contains.append(inside)
        records.append({"prompt": p, "output": o, "answers": g, "exact_match": hit, "contains": inside})
    if out_file is not None:
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(out)
    from finrecipe.eval.scoring import mean_stderr

    n = len(records)
    return {"metric": "exact_match", "value": sum(em) / n, "stderr": mean_stderr(em), "n": n,
            "higher_is_better": True,
            "metrics": {"exact_match": sum(em) / n, "exact_match_stderr": mean_stderr(em),
                        "contains": sum(contains) / n, "contains_stderr": mean_stderr(contains)},
            "outputs": str(out_file) if out_file else None}
