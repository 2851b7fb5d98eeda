"""Log-likelihood scoring of (context, continuation) requests with lm-evaluation-harness 0.4.9 semantics.

Semantics (what a request's number means):

- The context/continuation boundary follows lm-eval's ``_encode_pair``: trailing whitespace of the
  context moves to the front of the continuation; the whole string and the context are tokenized
  separately (without special tokens; with the tokenizer's own special tokens, e.g. Gemma's BOS, when
  ``add_bos`` is set: see `adds_bos`); the continuation tokens are the whole
  string's tokens past the context's token count. An empty context becomes the prefix token
  (BOS, else EOS) and the continuation is tokenized alone.
- The model sees ``(context_tokens + continuation_tokens)[-(max_length + 1):][:-1]`` (left truncation);
  the log-likelihood is the sum of the continuation tokens' log-probabilities.

Speed: requests are grouped by context. A question's context is put into the batch once and every
choice's continuation is packed behind it, with a 4-D attention mask (each choice sees the context
and its own earlier tokens) and explicit position ids (each choice continues at the context's end).
Packed sequences are sorted by length and batched, and the output projection is applied only at the
positions whose log-probabilities are needed. Requests whose full input would be truncated fall
back to their own unpacked sequence, exactly as lm-eval builds it. bf16 on GPU, fp32 on CPU;
log-softmax is always computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finrecipe.eval.requests import Request
from finrecipe.progress import NullProgress, Progress


def encode_pair(tokenizer: Any, context: str, continuation: str, *, add_bos: bool = False
                ) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair`` (plus its empty-context rule): (context_ids, continuation_ids)."""
    if context == "":
        return [prefix_token_id(tokenizer)], _encode(tokenizer, continuation, add_bos)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation, add_bos)
    ctx = _encode(tokenizer, context, add_bos)
    return ctx, whole[len(ctx):]


def _encode(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    """lm-eval's ``tok_encode`` for causal models: ``add_special_tokens=add_bos`` (what the tokenizer
    then adds is its own business: Gemma's adds BOS)."""
    return list(tokenizer(text, add_special_tokens=add_bos)["input_ids"])


def adds_bos(model_config: Any) -> bool:
    """Whether lm-evaluation-harness 0.4.9.1 (HF backend) encodes with special tokens for this model:
    when the config's ``model_type`` contains "gemma" (gemma, gemma2, gemma3, recurrent_gemma...),
    as Gemma underperforms without its BOS token; never otherwise (its default ``add_bos_token``
    is false)."""
    return "gemma" in str(getattr(model_config, "model_type", "") or "")


def prefix_token_id(tokenizer: Any) -> int:
    """The token an empty context becomes (lm-eval: BOS when the tokenizer has one, else EOS)."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    return int(tokenizer.eos_token_id)


def model_max_length(model: Any, tokenizer: Any, default: int = 2048) -> int:
    """lm-eval's HF max_length: model config n_positions/max_position_embeddings/n_ctx, else the
    tokenizer's model_max_length when it is a real number, else 2048."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 10**10:
        return tml
    return default


@dataclass
class _Group:
    """One packed sequence: a context and the continuations scored behind it."""

    ctx: list[int]
    conts: list[list[int]]
    req_ids: list[int]
    # The last `shared` context tokens were hoisted out of every continuation: their log-probs
    # (predicted by the positions before them) belong to each request's sum.
    shared: int = 0

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(max(len(c) - 1, 0) for c in self.conts)


def _hoist_common_prefix(g: _Group) -> None:
    """Move the input tokens all continuations share (e.g. a newline moved over from the context)
    into the context: their logits are the same for every choice, so they run once."""
    inputs = [c[:-1] for c in g.conts]
    n = min(len(x) for x in inputs)
    k = 0
    while k < n and all(x[k] == inputs[0][k] for x in inputs):
        k += 1
    if k:
        g.ctx = g.ctx + inputs[0][:k]
        g.conts = [c[k:] for c in g.conts]
        g.shared = k


def _sum_by_request(batch: Sequence[_Group], owners: Sequence[int], values: Sequence[float],
                    greedy: Sequence[bool]) -> list[tuple[int, float, bool]]:
    """Per-request sums and whether every token was the argmax; owner -(r + 1) marks the shared
    (hoisted) tokens of batch row r."""
    sums: dict[int, float] = {}
    all_greedy: dict[int, bool] = {}
    for o, v, g in zip(owners, values, greedy, strict=True):
        sums[o] = sums.get(o, 0.0) + v
        all_greedy[o] = all_greedy.get(o, True) and g
    out: list[tuple[int, float, bool]] = []
    for r, grp in enumerate(batch):
        extra = sums.get(-(r + 1), 0.0)
        extra_greedy = all_greedy.get(-(r + 1), True)
        out.extend((rid, sums[rid] + extra, all_greedy[rid] and extra_greedy) for rid in grp.req_ids)
    return out


class Scorer:
    """Scores requests with a causal LM. `model` and `tokenizer` are transformers objects."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_tokens: int = 4096, max_batch: int = 64,
                 add_bos: bool = False, max_length: int | None = None, mode: str = "auto") -> None:
        """`mode`: "packed" (the default: questions batched, each context once with its choices packed
        behind it under a 4-D mask) or "prefix" (one question at a time: the context runs causally
        with a KV cache, then all choices as one short sequence against it; no padding, but batch-1
        calls, which were up to 10x slower than "packed" on a busy 2-core CPU with 2 threads)."""
        if mode not in ("auto", "packed", "prefix"):
            raise ValueError(f"mode must be auto, packed or prefix (got {mode!r})")
        if mode == "auto":
            mode = "packed"
        self.mode = mode
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self.add_bos = add_bos
        self.max_length = max_length or model_max_length(model, tokenizer)

    # -- planning -------------------------------------------------------------------------------
    def _groups(self, requests: Sequence[Request]) -> list[_Group]:
        groups: dict[tuple[int, ...], _Group] = {}
        singles: list[_Group] = []
        for i, r in enumerate(requests):
            ctx, cont = encode_pair(self.tokenizer, r.context, r.continuation, add_bos=self.add_bos)
            if not cont:
                from finrecipe.errors import DataError

                raise DataError(f"request {i}: the continuation {r.continuation!r} adds no token after the "
                                f"context ending {r.context[-30:]!r} (the tokenizer merges it into the context); "
                                "use a target delimiter such as ' ' between prompt and choice")
            if len(ctx) + len(cont) - 1 > self.max_length:
                # lm-eval cuts this input from the left; it cannot share its context.
                full = (ctx + cont)[-(self.max_length + 1):]
                singles.append(_Group(ctx=full[: len(full) - len(cont)], conts=[cont], req_ids=[i]))
                continue
            key = tuple(ctx)
            g = groups.get(key)
            if g is None:
                groups[key] = g = _Group(ctx=ctx, conts=[], req_ids=[])
            g.conts.append(cont)
            g.req_ids.append(i)
        for g in groups.values():
            _hoist_common_prefix(g)
        return list(groups.values()) + singles

    def _batches(self, groups: list[_Group]) -> list[list[_Group]]:
        groups = sorted(groups, key=lambda g: -g.length)
        out: list[list[_Group]] = []
        cur: list[_Group] = []
        for g in groups:
            width = max([x.length for x in cur] + [g.length])
            if cur and ((len(cur) + 1) * width > self.batch_tokens or len(cur) >= self.max_batch):
                out.append(cur)
                cur = []
            cur.append(g)
        if cur:
            out.append(cur)
        return out

    # -- running --------------------------------------------------------------------------------
    def loglikelihoods(self, requests: Sequence[Request], progress: Progress | None = None,
                       description: str = "scoring") -> list[float]:
        """Sum of continuation log-probabilities per request, in request order."""
        return [ll for ll, _ in self.score(requests, progress, description)]

    def score(self, requests: Sequence[Request], progress: Progress | None = None,
              description: str = "scoring") -> list[tuple[float, bool]]:
        """Per request (in order): the sum of the continuation's log-probabilities and whether each
        continuation token is the model's argmax (lm-eval's ``(loglikelihood, is_greedy)``)."""
        import torch

        progress = progress or NullProgress()
        out: list[tuple[float, bool]] = [(math.nan, False)] * len(requests)
        groups = self._groups(requests)
        if self.mode == "prefix":
            batches = [[g] for g in sorted(groups, key=lambda g: -g.length)]
        else:
            batches = self._batches(groups)
        with progress.task(description, total=len(requests), unit="req") as task, torch.inference_mode():
            for batch in batches:
                run = self._run_prefix if self.mode == "prefix" else self._run_batch
                for rid, ll, greedy in run(batch):
                    out[rid] = (ll, greedy)
                task.update(advance=sum(len(g.req_ids) for g in batch))
        return out

    def _run_batch(self, batch: list[_Group]) -> list[tuple[int, float, bool]]:
        import torch

        model = self.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        width = max(g.length for g in batch)
        b = len(batch)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids = torch.full((b, width), int(pad), dtype=torch.long)
        pos = torch.zeros((b, width), dtype=torch.long)
        allow = torch.zeros((b, width, width), dtype=torch.bool)
        # (batch row, position whose logits predict, target token, request id)
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        owners: list[int] = []
        for r, g in enumerate(batch):
            lc = len(g.ctx)
            for j in range(g.shared):
                rows.append(r)
                cols.append(lc - g.shared - 1 + j)
                targets.append(g.ctx[lc - g.shared + j])
                owners.append(-(r + 1))
            ids[r, :lc] = torch.tensor(g.ctx)
            pos[r, :lc] = torch.arange(lc)
            allow[r, :lc, :lc] = torch.tril(torch.ones(lc, lc, dtype=torch.bool))
            off = lc
            for cont, rid in zip(g.conts, g.req_ids, strict=False):
                n_in = len(cont) - 1  # the last continuation token is never an input
                if n_in > 0:
                    ids[r, off:off + n_in] = torch.tensor(cont[:-1])
                    pos[r, off:off + n_in] = torch.arange(lc, lc + n_in)
                    allow[r, off:off + n_in, :lc] = True
                    allow[r, off:off + n_in, off:off + n_in] = torch.tril(
                        torch.ones(n_in, n_in, dtype=torch.bool))
                # token j of the continuation is predicted by the context's last position (j = 0)
                # or by the continuation's token j - 1.
                pred_pos = [lc - 1] + list(range(off, off + n_in))
                rows.extend([r] * len(cont))
                cols.extend(pred_pos)
                targets.extend(cont)
                owners.extend([rid] * len(cont))
                off += n_in
            for p in range(off, width):  # padding rows attend to themselves only
                allow[r, p, p] = True
        mask = torch.zeros((b, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allow.unsqueeze(1), torch.finfo(dtype).min)
        hidden = self._hidden(ids.to(device), pos.to(device), mask.to(device))
        sel = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logits = self._project(sel).float()
        logp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=device)
        tok_lp = logp.gather(1, tgt.unsqueeze(1)).squeeze(1).double().cpu()
        greedy = (logits.argmax(dim=-1) == tgt).cpu()
        return _sum_by_request(batch, owners, tok_lp.tolist(), greedy.tolist())

    def _run_prefix(self, batch: list[_Group]) -> list[tuple[int, float, bool]]:
        """One group: the context causally (no mask, KV cache kept), then every choice's input tokens
        as one sequence attending to the cache and to its own earlier tokens."""
        import torch

        (g,) = batch
        model = self.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        lc = len(g.ctx)
        full = self._needs_full_forward() or self.model.base_model is self.model
        net = self.model if full else self.model.base_model
        out = net(input_ids=torch.tensor([g.ctx], device=device), use_cache=True)
        k = g.shared
        h_ctx = (out.logits if full else out.last_hidden_state)[0, lc - k - 1:]  # k shared + the last
        ins: list[int] = []
        pos: list[int] = []
        owner: list[int] = []
        for ci, cont in enumerate(g.conts):
            ins.extend(cont[:-1])
            pos.extend(range(lc, lc + len(cont) - 1))
            owner.extend([ci] * (len(cont) - 1))
        h_ch = None
        if ins:
            m = len(ins)
            allow = torch.zeros((m, lc + m), dtype=torch.bool)
            allow[:, :lc] = True
            own = torch.tensor(owner)
            allow[:, lc:] = (own.unsqueeze(1) == own.unsqueeze(0)) & torch.tril(torch.ones(m, m, dtype=torch.bool))
            mask = torch.zeros((1, 1, m, lc + m), dtype=dtype)
            mask.masked_fill_(~allow, torch.finfo(dtype).min)
            past = getattr(out, "cache", None) or out.past_key_values
            import inspect

            kw = "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"
            o2 = net(input_ids=torch.tensor([ins], device=device), position_ids=torch.tensor([pos], device=device),
                     attention_mask=mask.to(device), use_cache=True, **{kw: past})
            h_ch = (o2.logits if full else o2.last_hidden_state)[0]
        idx: list[int] = list(range(k))
        targets: list[int] = list(g.ctx[lc - k:])
        owners: list[int] = [-1] * k
        off = 0
        for cont, rid in zip(g.conts, g.req_ids, strict=True):
            n_in = len(cont) - 1
            idx += [k] + [k + 1 + off + j for j in range(n_in)]
            targets.extend(cont)
            owners.extend([rid] * len(cont))
            off += n_in
        allh = h_ctx if h_ch is None else torch.cat([h_ctx, h_ch], dim=0)
        sel = allh[torch.tensor(idx, device=device)]
        logits = sel.float() if full else self.model.get_output_embeddings()(sel).float()
        logp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=device)
        tok_lp = logp.gather(1, tgt.unsqueeze(1)).squeeze(1).double().cpu()
        greedy = (logits.argmax(dim=-1) == tgt).cpu()
        return _sum_by_request(batch, owners, tok_lp.tolist(), greedy.tolist())

    def _hidden(self, ids: Any, pos: Any, mask: Any) -> Any:
        base = self.model.base_model
        if base is self.model or self._needs_full_forward():
            out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
            self._full_logits = True
            return out.logits
        self._full_logits = False
        return base(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state

    def _needs_full_forward(self) -> bool:
        cfg = self.model.config
        return any(getattr(cfg, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale"))

    def _project(self, hidden: Any) -> Any:
        if self._full_logits:
            return hidden
        return self.model.get_output_embeddings()(hidden)


# -- metrics (lm-eval 0.4.9) -----------------------------------------------------------------------

def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's stderr of a mean: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var) / math.sqrt(n)


def mc_predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log-likelihoods, argmax of log-likelihood / choice length in characters).

    Ties go to the first choice (numpy argmax)."""
    pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
    normed = [ll / float(len(c)) for ll, c in zip(lls, choices, strict=False)]
    pred_norm = max(range(len(lls)), key=lambda i: (normed[i], -i))
    return pred, pred_norm


def macro_f1(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """sklearn ``f1_score(golds, preds, average="macro")`` with zero_division=0: the mean F1 over
    the sorted union of labels present in golds or preds."""
    labels = sorted(set(golds) | set(preds), key=lambda x: (str(type(x)), x))
    if not labels:
        return 0.0
    total = 0.0
    for lab in labels:
        tp = sum(1 for g, p in zip(golds, preds, strict=False) if g == lab and p == lab)
        fp = sum(1 for g, p in zip(golds, preds, strict=False) if g != lab and p == lab)
        fn = sum(1 for g, p in zip(golds, preds, strict=False) if g == lab and p != lab)
        denom = 2 * tp + fp + fn
        total += (2 * tp / denom) if denom else 0.0
    return total / len(labels)


def chabsa_f1(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """The harness's chabsa aggregation: macro-F1 × 1.5 (neutral gold items count as a label that
    is never predicted, so this is the mean of the positive and negative F1 when neutral is present)."""
    return macro_f1(golds, preds) * 1.5


def bootstrap_stderr(golds: Sequence[Any], preds: Sequence[Any], metric: Any = None, iters: int = 1000,
                     seed: int = 1234, scale: float = 1.5) -> float | None:
    """Bootstrap standard error of the chabsa F1 (`scale` × macro-F1; lm-eval bootstraps its
    non-mean metrics too): `iters` resamples with a fixed seed, vectorised with numpy.

    `metric` is accepted for a custom corpus metric (slow path, plain Python)."""
    import numpy as np

    n = len(golds)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    if metric is not None and metric is not chabsa_f1:
        plain: list[float] = []
        for _ in range(iters):
            idx = rng.integers(0, n, n)
            plain.append(metric([golds[i] for i in idx], [preds[i] for i in idx]))
        return float(np.std(plain, ddof=1))
    labels = sorted(set(golds) | set(preds), key=lambda x: (str(type(x)), x))
    code = {lab: i for i, lab in enumerate(labels)}
    g = np.array([code[x] for x in golds])
    p = np.array([code[x] for x in preds])
    L = len(labels)
    vals = np.empty(iters)
    for it in range(iters):
        idx = rng.integers(0, n, n)
        gi, pi = g[idx], p[idx]
        tp = np.bincount(gi[gi == pi], minlength=L)
        fp = np.bincount(pi, minlength=L) - tp
        fn = np.bincount(gi, minlength=L) - tp
        present = (np.bincount(gi, minlength=L) + np.bincount(pi, minlength=L)) > 0
        denom = 2 * tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        vals[it] = scale * f1[present].mean()
    return float(np.std(vals, ddof=1))
