"""`perplexity: DATASET` (a recipe dataset) or `files: [...]`: held-out bits per byte.

    - perplexity: fin_heldout     # or files: [held.txt], name: held
      max_length: null            # window length (default: the model's)
      limit: null                 # first N documents

Each document's log-likelihood is lm-eval's rolling log-likelihood (`LM.loglikelihood_rolling`);
bits/byte = −Σ log p / (ln 2 · Σ UTF-8 bytes of the documents). Lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from finrecipe.errors import DataError
from finrecipe.eval.lm import LM
from finrecipe.eval.requests import RollingRequest
from finrecipe.eval.results import MetricInfo, TaskResult
from finrecipe.eval.suite import InputKind, KeyPath, Suite, SuiteContext, SuiteSpec, file_requests, register
from finrecipe.eval.textio import read_texts
from finrecipe.progress import Progress

if TYPE_CHECKING:
    from finrecipe.node import CheckContext
    from finrecipe.types import Request as Grant


class PerplexitySpec(SuiteSpec):
    perplexity: str | None = None
    files: list[str] | None = None
    name: str | None = None
    max_length: int | None = Field(default=None, gt=1)
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> PerplexitySpec:
        if (self.perplexity is None) == (self.files is None):
            raise ValueError("give exactly one of `perplexity: <dataset name>` or `files: [...]`")
        return self


def bits_per_byte(lm: LM, texts: Sequence[str], *, task: str = "perplexity", max_length: int | None = None,
                  progress: Progress | None = None) -> TaskResult:
    if not texts:
        raise DataError("perplexity: no documents")
    lls = lm.loglikelihood_rolling([RollingRequest(t) for t in texts], progress=progress, max_length=max_length)
    nll = 0.0
    for ll in lls:
        nll -= ll
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(lm.tok_encode(t)) for t in texts)
    bpb = nll / (math.log(2) * max(n_bytes, 1))
    return TaskResult(task=task, metric="bits_per_byte", value=bpb, stderr=None, n=len(texts),
                      higher_is_better=False, suite_version=Perplexity.version,
                      metrics={"bits_per_byte": bpb, "token_perplexity": math.exp(nll / max(n_tokens, 1)),
                               "tokens": n_tokens, "bytes": n_bytes})


@register
class Perplexity(Suite[PerplexitySpec]):
    name = "perplexity"
    keys = ("perplexity", "files")
    version = "1"
    Spec = PerplexitySpec
    metrics = {"bits_per_byte": MetricInfo(percent=False, label="bits/byte")}

    def task_names(self, spec: PerplexitySpec) -> list[str]:
        return ["ppl:" + (spec.name or spec.perplexity or Path((spec.files or ["files"])[0]).stem)]

    def inputs(self, spec: PerplexitySpec) -> Sequence[tuple[str, InputKind]]:
        return [(spec.perplexity, "dataset")] if spec.perplexity else []

    def requests(self, spec: PerplexitySpec, cc: CheckContext, where: KeyPath) -> list[Grant]:
        return file_requests(cc, where, "files", spec.files or [])

    def run(self, spec: PerplexitySpec, lm: LM, ctx: SuiteContext) -> list[TaskResult]:
        if spec.perplexity:
            ds = ctx.dataset(spec.perplexity)
            texts = read_texts(list(ds.files), ds.format, ds.text_field, spec.limit)
        else:
            texts = read_texts([ctx.path(f) for f in (spec.files or [])], None, "text", spec.limit)
        return [bits_per_byte(lm, texts, task=self.task_names(spec)[0], max_length=spec.max_length,
                              progress=ctx.progress)]


__all__ = ["Perplexity", "PerplexitySpec", "bits_per_byte"]
