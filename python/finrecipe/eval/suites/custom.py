"""`custom: FILE`: users' own exams, no code needed.

Multiple choice (``kind: multiple_choice``, the default; JSONL, one item per line)::

    {"question": "...", "choices": ["...", "..."], "answer": 1 | "choice text" | "B", "context": "..."}

The context is ``template.format(question=, context=, choices=)`` where ``choices`` is the choices
rendered one per line with ``choice_format`` (``{label}`` = A, B, ..., ``{choice}``, ``{index}``).
Each choice is scored as ``delimiter + choice`` (``score: choice``) or ``delimiter + label``
(``score: label``) with lm-eval's log-likelihood semantics; metrics acc and acc_norm with standard
errors. Default template: ``"{context}{question}\\n{choices}\\n答え:"`` (``{context}`` is the
context plus a newline when present, else empty).

Exact match (``kind: generation``; JSONL)::

    {"prompt": "...", "answer": "..."}   or   {"prompt": "...", "answers": ["...", "..."]}

The prompt is ``template.format(prompt=...)`` (default ``"{prompt}"``), optionally wrapped in the
model's chat template (``chat: true``); greedy decoding up to ``max_new_tokens``, cut at the first
stop string. Metrics: ``exact_match`` (after normalisation: NFKC, trimmed, lower-cased, whitespace
collapsed) and ``contains`` (a normalised answer occurs in the normalised output). Outputs are saved
to ``generations/<model>.custom-<name>.jsonl``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from finrecipe.errors import DataError
from finrecipe.eval.lm import LM
from finrecipe.eval.mc import MCItem, mc_metrics, score_items
from finrecipe.eval.requests import GenerationRequest
from finrecipe.eval.results import TaskResult
from finrecipe.eval.scoring import mean_stderr
from finrecipe.eval.suite import KeyPath, Suite, SuiteContext, SuiteSpec, file_requests, register
from finrecipe.eval.textio import read_jsonl
from finrecipe.progress import Progress
from finrecipe.util.fs import write_text_atomic

if TYPE_CHECKING:
    from finrecipe.node import CheckContext
    from finrecipe.types import Request as Grant

DEFAULT_MC_TEMPLATE = "{context}{question}\n{choices}\n答え:"


class CustomSpec(SuiteSpec):
    custom: str
    kind: Literal["multiple_choice", "generation"] = "multiple_choice"
    name: str | None = None
    template: str | None = None
    delimiter: str = " "
    choice_format: str = "{label}. {choice}"
    score: Literal["choice", "label"] = "choice"
    max_new_tokens: int = Field(default=64, gt=0)
    stop: list[str] = Field(default_factory=list)
    chat: bool = False
    limit: int | None = Field(default=None, gt=0)


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


def multiple_choice_items(path: str | Path, *, template: str | None = None, delimiter: str = " ",
                          choice_format: str = "{label}. {choice}", score: str = "choice",
                          limit: int | None = None) -> list[MCItem]:
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
    return items


def evaluate_multiple_choice(lm: LM, path: str | Path, *, task: str = "custom", template: str | None = None,
                             delimiter: str = " ", choice_format: str = "{label}. {choice}",
                             score: str = "choice", limit: int | None = None,
                             progress: Progress | None = None) -> TaskResult:
    items = multiple_choice_items(path, template=template, delimiter=delimiter, choice_format=choice_format,
                                  score=score, limit=limit)
    lls = score_items(lm, items, progress, f"custom {Path(path).name}")
    m = mc_metrics(items, lls)
    return TaskResult(task=task, metric="acc", value=m["acc"], stderr=m["acc_stderr"], n=len(items),
                      higher_is_better=True, suite_version=Custom.version,
                      metrics={k: v for k, v in m.items() if k != "predictions"})


def normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).strip().lower()
    return re.sub(r"\s+", " ", s)


def evaluate_generation(lm: LM, path: str | Path, *, task: str = "custom", template: str | None = None,
                        max_new_tokens: int = 64, stop: list[str] | None = None, chat: bool = False,
                        limit: int | None = None, out_file: str | Path | None = None,
                        progress: Progress | None = None) -> TaskResult:
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
    outputs = lm.generate_until([GenerationRequest(p, tuple(stop or ()), max_new_tokens, chat) for p in prompts],
                                progress=progress)
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
        write_text_atomic(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    n = len(records)
    return TaskResult(task=task, metric="exact_match", value=sum(em) / n, stderr=mean_stderr(em), n=n,
                      higher_is_better=True, suite_version=Custom.version,
                      metrics={"exact_match": sum(em) / n, "exact_match_stderr": mean_stderr(em),
                               "contains": sum(contains) / n, "contains_stderr": mean_stderr(contains)},
                      extra={"outputs": str(out_file) if out_file else None})


@register
class Custom(Suite[CustomSpec]):
    name = "custom"
    keys = ("custom",)
    version = "1"
    Spec = CustomSpec

    def task_names(self, spec: CustomSpec) -> list[str]:
        return ["custom:" + (spec.name or Path(spec.custom).stem)]

    def requests(self, spec: CustomSpec, cc: CheckContext, where: KeyPath) -> list[Grant]:
        return file_requests(cc, where, "custom", [spec.custom])

    def run(self, spec: CustomSpec, lm: LM, ctx: SuiteContext) -> list[TaskResult]:
        (task,) = self.task_names(spec)
        path = ctx.path(spec.custom)
        if spec.kind == "multiple_choice":
            return [evaluate_multiple_choice(lm, path, task=task, template=spec.template, delimiter=spec.delimiter,
                                             choice_format=spec.choice_format, score=spec.score, limit=spec.limit,
                                             progress=ctx.progress)]
        out = ctx.output_file(task)
        r = evaluate_generation(lm, path, task=task, template=spec.template, max_new_tokens=spec.max_new_tokens,
                                stop=spec.stop, chat=spec.chat, limit=spec.limit, out_file=out,
                                progress=ctx.progress)
        ctx.artifacts[f"generations_{ctx.model}_{task}"] = str(out)
        return [r]


__all__ = ["Custom", "CustomSpec", "evaluate_generation", "evaluate_multiple_choice", "multiple_choice_items",
           "normalize", "render_mc"]
