"""The model an evaluation suite talks to: one wrapper with lm-evaluation-harness's three requests.

    lm.loglikelihood([Request(context, continuation), ...])  -> [(log-prob sum, is_greedy), ...]
    lm.loglikelihood_rolling([RollingRequest(text), ...])     -> [log-prob of the whole text, ...]
    lm.generate_until([GenerationRequest(context, until), ...]) -> [greedy continuation, ...]

`HFLM` implements them for a local Hugging Face causal LM: log-likelihoods with the packed scorer of
`finrecipe.eval.scoring` (lm-eval 0.4.9 semantics), rolling log-likelihoods over disjoint windows
(lm-eval's ``get_rolling_token_windows`` with context length 1: the first window is
``[prefix] + tokens[:L-1]`` predicting ``tokens[:L]``, prefix = BOS else EOS; later windows predict
the next L tokens from the L tokens before their end), and batched greedy generation (left padding,
sorted by length, cut at the first stop string). Suites never touch torch themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from finrecipe.eval.requests import GenerationRequest, Request, RollingRequest
from finrecipe.progress import NullProgress, Progress


class LM(Protocol):
    """What `Suite.run` receives."""

    def loglikelihood(self, requests: Sequence[Request], *, progress: Progress | None = None,
                      description: str = "scoring") -> list[tuple[float, bool]]: ...

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest], *, progress: Progress | None = None,
                              description: str = "perplexity", max_length: int | None = None) -> list[float]: ...

    def generate_until(self, requests: Sequence[GenerationRequest], *, progress: Progress | None = None,
                       description: str = "generate") -> list[str]: ...

    def tok_encode(self, text: str) -> list[int]: ...


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, predicted ids): inputs are at most max_len long; targets are the last len(pred)."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    out.append(([prefix] + tokens[:first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        inp = tokens[max(0, end - max_len - 1):end - 1]
        out.append((inp, tokens[end - n:end]))
        done = end
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any non-empty stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


def apply_chat(tokenizer: Any, prompt: str) -> tuple[str, bool]:
    """(text, whether special tokens are already in it): the prompt as one user turn of the
    tokenizer's chat template, or the prompt itself when the tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return str(text), True
    return prompt, False


class HFLM:
    """A loaded Hugging Face causal LM (`model`, `tokenizer`) behind the `LM` requests.

    `max_length` (default: the model's, see `scoring.model_max_length`) bounds the inputs of
    log-likelihoods and rolling windows; `batch_size` caps questions per scoring batch (default:
    by tokens) and prompts per generation batch (default 16). `add_bos` (default: lm-eval's rule,
    `scoring.adds_bos`: Gemma-family models only) encodes texts for log-likelihoods with the
    tokenizer's special tokens."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int | None = None, add_bos: bool | None = None,
                 max_length: int | None = None, mode: str = "auto") -> None:
        from finrecipe.eval.scoring import Scorer, adds_bos

        if add_bos is None:
            add_bos = adds_bos(getattr(model, "config", None))
        self.add_bos = add_bos

        kw: dict[str, Any] = {}
        if batch_size:
            kw["max_batch"] = batch_size
            kw["batch_tokens"] = 1 << 30
        self.model = model
        self.tokenizer = tokenizer
        self.scorer = Scorer(model, tokenizer, add_bos=add_bos, max_length=max_length, mode=mode, **kw)
        self.max_length = self.scorer.max_length
        self.gen_batch_size = batch_size or 16

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, dtype: str | None = None,
             batch_size: int | None = None, trust_remote_code: bool = False) -> HFLM:
        from finrecipe.eval.model import load_model

        model, tok = load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(model, tok, batch_size=batch_size)

    def tok_encode(self, text: str) -> list[int]:
        """lm-eval's ``tok_encode``: special tokens only where lm-eval adds them (`add_bos`)."""
        return list(self.tokenizer(text, add_special_tokens=self.add_bos)["input_ids"])

    # -- loglikelihood ---------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Request], *, progress: Progress | None = None,
                      description: str = "scoring") -> list[tuple[float, bool]]:
        return self.scorer.score(requests, progress=progress, description=description)

    # -- loglikelihood_rolling -------------------------------------------------------------------
    def loglikelihood_rolling(self, requests: Sequence[RollingRequest], *, progress: Progress | None = None,
                              description: str = "perplexity", max_length: int | None = None) -> list[float]:
        import torch

        from finrecipe.eval.scoring import prefix_token_id

        progress = progress or NullProgress()
        L = max_length or self.max_length
        prefix = prefix_token_id(self.tokenizer)
        device = next(self.model.parameters()).device
        out: list[float] = []
        with progress.task(description, total=len(requests)) as task, torch.inference_mode():
            for r in requests:
                ll = 0.0
                for inp, pred in rolling_windows(self.tok_encode(r.text), prefix, L):
                    x = torch.tensor([inp], device=device)
                    logp = torch.log_softmax(self.model(input_ids=x).logits[0].float(), dim=-1)
                    tgt = torch.tensor(pred, device=device)
                    rows = logp[len(inp) - len(pred):]
                    ll += rows.gather(1, tgt.unsqueeze(1)).sum().item()
                out.append(ll)
                task.update(advance=1)
        return out

    # -- generate_until --------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[GenerationRequest], *, progress: Progress | None = None,
                       description: str = "generate", batch_size: int | None = None) -> list[str]:
        """Greedy continuations. Requests that share (max_new_tokens, chat) are batched together
        (left padding, longest first); `batch_size=1` runs them one at a time."""
        import torch

        progress = progress or NullProgress()
        tok = self.tokenizer
        model = self.model
        bs = max(1, batch_size or self.gen_batch_size)
        device = next(model.parameters()).device
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if pad is None:
            pad = 0
        encoded: list[list[int]] = []
        for r in requests:
            text, special = apply_chat(tok, r.context) if r.chat else (r.context, False)
            encoded.append(list(tok(text, add_special_tokens=not special)["input_ids"]))
        outs = [""] * len(requests)
        by_setting: dict[tuple[int, bool], list[int]] = {}
        for i, r in enumerate(requests):
            by_setting.setdefault((r.max_new_tokens, r.chat), []).append(i)
        with progress.task(description, total=len(requests)) as task, torch.inference_mode():
            for (max_new, _chat), members in by_setting.items():
                order = sorted(members, key=lambda i: -len(encoded[i]))
                for b0 in range(0, len(order), bs):
                    idx = order[b0:b0 + bs]
                    width = max(len(encoded[i]) for i in idx)
                    ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
                    att = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):
                        n = len(encoded[i])
                        ids[row, width - n:] = torch.tensor(encoded[i])
                        att[row, width - n:] = 1
                    gen = model.generate(ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new,
                                         do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
                    for row, i in enumerate(idx):
                        new = gen[row, width:].tolist()
                        if eos is not None and eos in new:
                            new = new[:new.index(eos)]
                        outs[i] = cut_at_stop(tok.decode(new, skip_special_tokens=True), requests[i].until)
                    task.update(advance=len(idx))
        return outs


__all__ = ["HFLM", "LM", "apply_chat", "cut_at_stop", "rolling_windows"]
