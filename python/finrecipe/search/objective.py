"""The objective of a merge search: signals that need no instruction data, and the selection rule.

- **domain**: bits per byte on held-out domain text (a dataset the recipe names as held out, or a
  split of the domain corpus taken off deterministically by document). Each document's
  log-likelihood uses lm-eval's rolling windows (as the `perplexity` evaluation suite does), so the
  number is the one an `evaluate` stage reports for the same text. Lower is better.
- **instruction agreement**: the instruct model's greedy responses to a set of prompts (bundled
  general prompts or the team's own; no answers needed) are generated once; a candidate is scored by
  the mean per-token log-likelihood it gives those exact response tokens (end-of-sequence
  included: stopping is behaviour too). Reported relative to the instruct model itself:
  ``agreement = exp(mean log p_candidate − mean log p_instruct)`` (1.0 = as likely as under the
  instruct model). ``token_agreement`` is the fraction of response tokens that are the candidate's
  argmax (1.0 for the instruct model).
- **tasks** (optional): the team's own exams (any evaluation suite entry, e.g. `custom:`) run as
  development tasks on the candidate.

Selection (`SelectRule`): ``constrained`` (default): the best domain score among candidates whose
agreement is at least ``min_agreement``; ``weighted``: the best weighted sum. The domain score is
``−bits_per_byte`` (higher is better) plus, for each dev task, ``weight × value`` (negated when
lower is better). Everything is deterministic for fixed inputs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUNDLED_PROMPTS = "bundled"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainObjective(_Strict):
    """Held-out domain text: `dataset:` (all of it is held out) or `dataset:` + `holdout:` (a fraction
    of its documents, chosen by a hash of each document's text: the same documents whatever their
    order; the training stage must not see them)."""

    dataset: str
    holdout: float | None = Field(default=None, gt=0.0, lt=1.0)
    limit: int | None = Field(default=None, gt=0)  # first N held-out documents
    max_length: int | None = Field(default=None, gt=1)  # window length (default: the model's)


class InstructionObjective(_Strict):
    """Prompts whose instruct responses a candidate should keep: `bundled` (general English prompts
    shipped with finrecipe) or a JSONL file with a `prompt` field (relative to the recipe)."""

    prompts: str = BUNDLED_PROMPTS
    limit: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=48, gt=0, le=1024)
    chat: bool = True  # wrap prompts in the instruct tokenizer's chat template (when it has one)


class SelectRule(_Strict):
    rule: Literal["constrained", "weighted"] = "constrained"
    min_agreement: float = Field(default=0.9, gt=0.0, le=1.5)  # constrained: fraction of instruct's
    # weighted: score = domain·(−bpb) + instruction·agreement + Σ task weight·value;
    # constrained: the same without the instruction term, among candidates meeting min_agreement
    weights: dict[str, float] = Field(default_factory=lambda: {"domain": 1.0, "instruction": 1.0})

    @model_validator(mode="after")
    def _weights(self) -> SelectRule:
        for k, v in self.weights.items():
            if not math.isfinite(v):
                raise ValueError(f"weights.{k} must be a finite number")
        return self


# ------------------------------------------------------------------------------- data, prepared once

def split_documents(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(kept, held out): a document is held out when the first 8 bytes of sha256(text), as a
    fraction of 2^64, fall below `fraction` (independent of order and of the other documents)."""
    kept: list[str] = []
    held: list[str] = []
    for t in texts:
        h = int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "big") / 2.0**64
        (held if h < fraction else kept).append(t)
    return kept, held


@dataclass
class Item:
    """One scored sequence: `inputs` fed to the model; the last len(targets) positions predict
    `targets`."""

    inputs: list[int]
    targets: list[int]


@dataclass
class DevData:
    """Tokenized development data, reused by every trial."""

    domain_items: list[Item]
    domain_bytes: int
    domain_docs: int
    response_items: list[Item] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    instruct_logprob: float | None = None  # mean per-token log p of the responses under instruct
    description: dict[str, Any] = field(default_factory=dict)


def rolling_items(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Item]:
    """lm-eval's rolling windows of every document (context length 1; prefix BOS, else EOS)."""
    from finrecipe.eval.lm import rolling_windows
    from finrecipe.eval.scoring import prefix_token_id

    prefix = prefix_token_id(tokenizer)
    out: list[Item] = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        for inp, pred in rolling_windows(ids, prefix, max_length):
            out.append(Item(inp, pred))
    return out


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    from finrecipe.eval.lm import apply_chat

    text, special = apply_chat(tokenizer, prompt) if chat else (prompt, False)
    return list(tokenizer(text, add_special_tokens=not special)["input_ids"])


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                       chat: bool, batch_size: int = 16) -> list[dict[str, Any]]:
    """Greedy responses as token ids (cut after the first end-of-sequence token, which is kept)."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    device = next(model.parameters()).device
    enc = [prompt_ids(tokenizer, p, chat) for p in prompts]
    out: list[dict[str, Any]] = [{} for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            idx = order[b0:b0 + batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                att[r, width - len(enc[i]):] = 1
            gen = model.generate(ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=int(pad), eos_token_id=eos)
            for r, i in enumerate(idx):
                new = [int(x) for x in gen[r, width:].tolist()]
                if eos is not None and eos in new:
                    new = new[:new.index(eos) + 1]
                out[i] = {"prompt": prompts[i], "prompt_ids": enc[i], "response_ids": new,
                          "response": tokenizer.decode(new, skip_special_tokens=True)}
    return out


def response_items(responses: Sequence[Mapping[str, Any]], max_length: int) -> list[Item]:
    out = []
    for r in responses:
        resp = list(r["response_ids"])
        if not resp:
            continue
        full = (list(r["prompt_ids"]) + resp)[-(max_length + 1):]
        out.append(Item(full[:-1], full[len(full) - len(resp):]))
    return out


# ------------------------------------------------------------------------------- scoring

def score_items(model: Any, items: Sequence[Item], *, pad_id: int = 0, batch_tokens: int = 8192
                ) -> tuple[float, int, int]:
    """(Σ log p of all targets, number of targets, number of targets that are the argmax), in fp32
    log-softmax; sequences are right-padded and batched by length."""
    import torch

    if not items:
        return 0.0, 0, 0
    device = next(model.parameters()).device
    cfg = model.config
    full = model.base_model is model or any(getattr(cfg, a, None) not in (None, 1.0)
                                            for a in ("final_logit_softcapping", "logit_scale"))
    order = sorted(range(len(items)), key=lambda i: -len(items[i].inputs))
    total = 0.0
    n = 0
    hits = 0
    i = 0
    with torch.inference_mode():
        while i < len(order):
            width = len(items[order[i]].inputs)
            rows = max(1, batch_tokens // max(width, 1))
            batch = [items[j] for j in order[i:i + rows]]
            i += len(batch)
            ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            r_idx: list[int] = []
            c_idx: list[int] = []
            tgt: list[int] = []
            for r, it in enumerate(batch):
                L = len(it.inputs)
                ids[r, :L] = torch.tensor(it.inputs)
                att[r, :L] = 1
                k = len(it.targets)
                r_idx += [r] * k
                c_idx += list(range(L - k, L))
                tgt += it.targets
            ids, att = ids.to(device), att.to(device)
            if full:
                h = model(input_ids=ids, attention_mask=att, use_cache=False).logits
            else:
                h = model.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
            sel = h[torch.tensor(r_idx, device=device), torch.tensor(c_idx, device=device)]
            logits = (sel if full else model.get_output_embeddings()(sel)).float()
            logp = torch.log_softmax(logits, dim=-1)
            t = torch.tensor(tgt, device=device)
            total += float(logp.gather(1, t.unsqueeze(1)).double().sum())
            hits += int((logits.argmax(-1) == t).sum())
            n += len(tgt)
    return total, n, hits


@dataclass
class Scores:
    """What one candidate scored on the development data."""

    bits_per_byte: float
    agreement: float | None = None
    token_agreement: float | None = None
    response_logprob: float | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"bits_per_byte": self.bits_per_byte, "agreement": self.agreement,
                "token_agreement": self.token_agreement, "response_logprob": self.response_logprob,
                "tasks": self.tasks}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Scores:
        return cls(float(d["bits_per_byte"]), d.get("agreement"), d.get("token_agreement"),
                   d.get("response_logprob"), dict(d.get("tasks") or {}))


def score_model(model: Any, data: DevData, *, pad_id: int = 0, batch_tokens: int = 8192) -> Scores:
    """Domain bits per byte and instruction agreement of the model's current weights."""
    ll, _, _ = score_items(model, data.domain_items, pad_id=pad_id, batch_tokens=batch_tokens)
    bpb = -ll / (math.log(2) * max(data.domain_bytes, 1))
    s = Scores(bits_per_byte=bpb)
    if data.response_items:
        rl, rn, rh = score_items(model, data.response_items, pad_id=pad_id, batch_tokens=batch_tokens)
        mean = rl / max(rn, 1)
        s.response_logprob = mean
        s.token_agreement = rh / max(rn, 1)
        if data.instruct_logprob is not None:
            s.agreement = math.exp(mean - data.instruct_logprob)
    return s


# ------------------------------------------------------------------------------- selection

def domain_score(s: Scores, weights: Mapping[str, float]) -> float:
    v = -weights.get("domain", 1.0) * s.bits_per_byte
    for name, t in s.tasks.items():
        w = weights.get(name, 0.0)
        if w and t.get("value") is not None:
            v += w * (float(t["value"]) if t.get("higher_is_better", True) else -float(t["value"]))
    return v


def utility(s: Scores, rule: SelectRule) -> float:
    """The number the rule maximises (constrained: the domain score; feasibility is separate)."""
    v = domain_score(s, rule.weights)
    if rule.rule == "weighted" and s.agreement is not None:
        v += rule.weights.get("instruction", 1.0) * s.agreement
    return v


def feasible(s: Scores, rule: SelectRule) -> bool:
    if rule.rule != "constrained" or s.agreement is None:
        return True
    return s.agreement >= rule.min_agreement


def select(scored: Sequence[tuple[str, Scores]], rule: SelectRule) -> tuple[str, bool]:
    """(id of the selected trial, whether the rule's constraint was met). Constrained: the best
    domain score among feasible trials; when none is feasible, the trial with the highest
    agreement (and the constraint is reported as not met). Ties go to the earlier trial."""
    if not scored:
        raise ValueError("no trials to select from")
    feas = [(i, s) for i, s in scored if feasible(s, rule)]
    if feas:
        best = max(range(len(feas)), key=lambda j: (utility(feas[j][1], rule), -j))
        return feas[best][0], True
    best = max(range(len(scored)), key=lambda j: (scored[j][1].agreement or 0.0, -j))
    return scored[best][0], False


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Ids of the trials not dominated in (lower bits/byte, higher agreement)."""
    out = []
    for i, b, a in points:
        if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for _, b2, a2 in points):
            out.append(i)
    return out


__all__ = ["BUNDLED_PROMPTS", "DevData", "DomainObjective", "InstructionObjective", "Item", "Scores",
           "SelectRule", "domain_score", "feasible", "generate_responses", "pareto_front", "prompt_ids",
           "response_items", "rolling_items", "score_items", "score_model", "select", "split_documents",
           "utility"]
