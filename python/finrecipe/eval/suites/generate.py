"""`generate: FILE`: instruction following. Greedy generation with the model's chat template, the
outputs saved, and an optional judge through an OpenAI-compatible endpoint (pfmt-bench-fin-ja style
scores 1–10).

    - generate: prompts.jsonl          # {"prompt": ...} (or {"question": ...}) per line, or a .txt file
      max_new_tokens: 256
      judge: {url: http://127.0.0.1:8000/v1, model: judge-model}

Without ``judge`` the outputs are saved with no score (the result notes it). Sending prompts and
answers to the judge's host is a request the person running the recipe grants (``--allow-judge
HOST``); so is the API key: it is read from the variable they name (``--judge-key-env VAR``), never
from one the recipe names (a recipe's ``api_key_env`` is refused unless the user names a variable). The judge gets the
question and the answer and must reply with a score; the first integer 1–10 after "評価" / "score"
(or the first integer 1–10 at all) is taken.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from finrecipe.errors import DataError, FinrecipeError
from finrecipe.eval.lm import LM
from finrecipe.eval.requests import GenerationRequest
from finrecipe.eval.results import MetricInfo, TaskResult
from finrecipe.eval.scoring import mean_stderr
from finrecipe.eval.suite import KeyPath, Suite, SuiteContext, SuiteSpec, file_requests, register
from finrecipe.eval.textio import read_jsonl
from finrecipe.progress import Progress
from finrecipe.types import Request as Grant
from finrecipe.util.fs import write_text_atomic

if TYPE_CHECKING:
    from finrecipe.node import CheckContext

JUDGE_PROMPT = (
    "あなたは金融分野の専門家として、AIアシスタントの回答の質を評価します。"
    "有用性、正確性、指示への従い方、日本語の自然さを考慮し、1から10の整数で採点してください。"
    "最後に必ず「評価: [[N]]」の形式で点数を書いてください。\n\n"
    "[質問]\n{question}\n\n[回答]\n{answer}\n"
)


class JudgeSpec(SuiteSpec):
    url: str
    model: str
    api_key_env: str | None = None


class GenerateSpec(SuiteSpec):
    generate: str
    name: str | None = None
    max_new_tokens: int = Field(default=256, gt=0)
    judge: JudgeSpec | None = None
    limit: int | None = Field(default=None, gt=0)


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prompt file not found")
    if p.suffix == ".txt":
        prompts = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
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


def judge_host(url: str) -> str:
    """The host part of a judge URL (what `--allow-judge` grants)."""
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or url).lower()


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


def run_generation(lm: LM, prompts_file: str | Path, *, out_file: str | Path, task: str = "generate",
                   max_new_tokens: int = 256, judge: JudgeSpec | None = None, limit: int | None = None,
                   key_env: str | None = None, progress: Progress | None = None) -> TaskResult:
    """Generate, save, and score with the judge when one is given. `key_env`: the variable the
    user named for the judge's API key (the recipe's `api_key_env` is not read)."""
    if judge is not None and judge.api_key_env and not key_env:
        raise FinrecipeError(f"judge.api_key_env: {judge.api_key_env!r} is named by the recipe; a recipe cannot "
                             "choose which environment variable finrecipe reads: run with --judge-key-env VAR "
                             "(or FINRECIPE_JUDGE_KEY_ENV=VAR) naming the variable that holds the key")
    prompts = read_prompts(prompts_file, limit)
    outputs = lm.generate_until([GenerationRequest(p, (), max_new_tokens, True) for p in prompts],
                                progress=progress)
    scores: list[int | None] = [None] * len(prompts)
    note = None
    if judge:
        scores = judge_scores(prompts, outputs, url=judge.url, model=judge.model, api_key_env=key_env)
    else:
        note = "no judge configured (judge: {url, model}); outputs saved without scores"
    write_text_atomic(out_file, "".join(json.dumps({"prompt": p, "output": o, "score": s}, ensure_ascii=False) + "\n"
                                        for p, o, s in zip(prompts, outputs, scores, strict=True)))
    valid = [s for s in scores if s is not None]
    return TaskResult(task=task, metric="judge_score", value=(sum(valid) / len(valid)) if valid else None,
                      stderr=mean_stderr([float(s) for s in valid]), n=len(prompts), higher_is_better=True,
                      suite_version=Generate.version, extra={"note": note, "outputs": str(out_file)})


@register
class Generate(Suite[GenerateSpec]):
    name = "generate"
    keys = ("generate",)
    version = "1"
    Spec = GenerateSpec
    metrics = {"judge_score": MetricInfo(percent=False, label="judge scores")}

    def task_names(self, spec: GenerateSpec) -> list[str]:
        return ["gen:" + (spec.name or Path(spec.generate).stem)]

    def requests(self, spec: GenerateSpec, cc: CheckContext, where: KeyPath) -> list[Grant]:
        out = file_requests(cc, where, "generate", [spec.generate])
        if spec.judge is not None:
            host = judge_host(spec.judge.url)
            key = ".".join(map(str, (cc.section, cc.node, *where, "judge", "url")))
            out.append(Grant("host", host, f"{key} sends prompts and answers to {host}", f"--allow-judge {host}"))
        return out

    def run(self, spec: GenerateSpec, lm: LM, ctx: SuiteContext) -> list[TaskResult]:
        (task,) = self.task_names(spec)
        out = ctx.output_file(task)
        r = run_generation(lm, ctx.path(spec.generate), out_file=out, task=task, max_new_tokens=spec.max_new_tokens,
                           judge=spec.judge, limit=spec.limit, key_env=ctx.grants.judge_key_env,
                           progress=ctx.progress)
        ctx.artifacts[f"generations_{ctx.model}_{task}"] = str(out)
        return [r]


__all__ = ["JUDGE_PROMPT", "Generate", "GenerateSpec", "JudgeSpec", "judge_host", "judge_scores", "parse_score",
           "read_prompts",
           "run_generation"]
