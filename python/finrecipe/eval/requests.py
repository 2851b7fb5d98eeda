"""The three request shapes of lm-evaluation-harness that an evaluation suite sends to a model
(`finrecipe.eval.lm.LM`); plain values, no dependencies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """`loglikelihood`: the log-probability of `continuation` after `context`."""

    context: str
    continuation: str


@dataclass(frozen=True)
class RollingRequest:
    """`loglikelihood_rolling`: the log-probability of the whole `text` (perplexity)."""

    text: str


@dataclass(frozen=True)
class GenerationRequest:
    """`generate_until`: greedy continuation of `context`, cut at the first string of `until`.
    With `chat` the context is wrapped in the model's chat template as one user turn."""

    context: str
    until: tuple[str, ...] = ()
    max_new_tokens: int = 64
    chat: bool = False


__all__ = ["GenerationRequest", "Request", "RollingRequest"]
