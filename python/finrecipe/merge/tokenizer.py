"""The output vocabulary of a merge: `tokenizer_source` and the `tokenizer:` section (mergekit's).

With either set, the merge has an output tokenizer and every vocabulary tensor (embed_tokens,
lm_head, ...: rows = tokens) of every input model is first rearranged into the output vocabulary,
with mergekit 0.1.5's rules:

- `base`: the base model's tokenizer (or the first model's when there is no base_model);
  `union`: the base tokenizer plus every token of the other models it lacks, appended as added
  tokens (plain tokens first, then the models' own added/special tokens), in the order of the
  models in the config and, within a model, of their ids; a model name: that model's tokenizer.
  Tokens named under `tokenizer.tokens` that the result lacks are added last.
- Output row r of model M is M's row of the same token. A token that M lacks (or one marked
  `force`) gets: the row named by `tokens.<TOKEN>.source` (a model's row of that token, a
  `{kind: model_token}` row, or `{kind: zero}`); else, when only one model has the token, that
  model's row; else the base model's; else the mean of the rows of the models that have it.
- `pad_to_multiple_of`: the row count is rounded up; each model's padding rows are the mean of its
  rearranged rows. config.json's `vocab_size` becomes the (padded) row count.

Planning (`plan_vocabulary`, `vocab_entry`) loads only the tokenizers and reads headers; every
refusal happens there. At run time `write_vocab_inputs` reads one vocabulary tensor of each input
model at a time (memory: the input models' copies of that one tensor plus one output), writes each
model's rearranged tensor to a temporary safetensors file in the output's temporary directory and
points the plan at it; the Rust core then merges as usual. Where every model's vocabulary already is
the output vocabulary in order (no padding, no forced token), the tensor is merged directly.

Where mergekit 0.1.5 differs: it orders the tokens a union appends by Python set and Rust hash-map
iteration, so their ids change from run to run (and with no base_model it picks a random model's
tokenizer as the base); finrecipe's order is the one above, the same on every run. A model whose
tokenizer cannot be loaded is refused (mergekit assumes it is the base's); so is a tokenizer with
token ids at or beyond the model's `vocab_size` (mergekit drops them from the base and fails later
on the others).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError, IoError, MismatchError
from finrecipe.merge.config import DTYPES, MergeConfig, ModelTokenSource, TokenEmbedding, ZeroSource
from finrecipe.merge.headers import ModelInfo, TensorInfo

log = logging.getLogger("finrecipe.merge")

VOCAB_HINTS = ("embed_tokens", "lm_head", "embed_in", "embed_out", "wte", "word_embeddings")
VOCAB_DIR = ".finrecipe-vocab"  # inside the output's temporary directory; removed before the rename
_TORCH = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class VocabJob:
    """One vocabulary tensor of the plan: which plan entry, and the input tensors it reads."""

    entry: int  # index into plan["tensors"]
    name: str  # output tensor name
    refs: list[tuple[str, str, str]]  # (model, tensor, file) in the plan entry's order (base first)
    order: list[str]  # the models in mergekit's order (the config's list; base last when not listed)
    base: str | None  # the base model for the default rules
    identity: bool  # every model's rows already are the output rows: no rearranging needed


@dataclass
class VocabPlan:
    source: str  # base | union | a model name
    tokenizer: Any  # the output tokenizer (transformers), saved into the output
    vocab: dict[str, int]  # output token -> id
    rows: int  # output rows (len(vocab), padded)
    perms: dict[str, list[int]]  # model -> per output id its own id of that token (-1: lacks it)
    orig_vocabs: dict[str, dict[str, int]]
    vocab_sizes: dict[str, int]
    tokens: dict[str, TokenEmbedding]
    dtype: str | None  # the config's dtype: the inputs are cast to it first (mergekit's rule)
    jobs: list[VocabJob] = field(default_factory=list)

    def is_identity(self, model: str, nrows: int) -> bool:
        p = self.perms[model]
        return nrows == self.rows == len(p) and all(i == r for r, i in enumerate(p))


def is_vocab_tensor(name: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """A tensor whose rows are tokens (mergekit's `vocabulary_axis: 0` weights)."""
    return (any(h in name for h in VOCAB_HINTS) and len(shape) >= 1
            and (vocab_size is None or shape[0] == vocab_size))


def _where(cfg: MergeConfig) -> tuple[str, ...]:
    return ("tokenizer_source",) if cfg.tokenizer_source is not None else ("tokenizer", "source")


def _config_vocab_size(path: Path) -> int | None:
    try:
        c = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    v = c.get("vocab_size")
    return int(v) if isinstance(v, int) else None


def load_tokenizer(name: str, path: Path) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # transformers raises many kinds; the message names the model
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MismatchError(f"model {name!r} ({path}): its tokenizer cannot be loaded ({first}); with "
                            "tokenizer_source / tokenizer every input model needs its tokenizer files "
                            "(tokenizer.json and tokenizer_config.json)") from None


def plan_vocabulary(cfg: MergeConfig, paths: dict[str, Path]) -> VocabPlan | None:
    """The output vocabulary and each model's permutation into it, or None without tokenizer_source
    / tokenizer. Loads the tokenizers only; refuses what cannot be done exactly."""
    src = cfg.tokenizer_source_name
    names = list(paths)  # base first when given, then the config's order
    base = cfg.base_model or names[0]
    if src is None:
        d = paths[base]
        if cfg.chat_template is not None and not ((d / "tokenizer_config.json").is_file() and (
                (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file())):
            raise MismatchError(f"chat_template is set but model {base!r} ({d}), whose tokenizer the output "
                                "gets, has no tokenizer files (tokenizer_config.json and tokenizer.json or "
                                "tokenizer.model)")
        return None
    if src not in ("base", "union") and src not in paths:
        from finrecipe.yamlio import suggest

        raise cfg.error(f"tokenizer source {src!r} is not one of the models" + suggest(src, list(paths))
                        + "; use 'base', 'union' or a model name", _where(cfg))
    if _config_vocab_size(paths[base]) is None:  # the output config.json is the base's (the donor's)
        raise MismatchError(f"model {base!r} ({paths[base]}): config.json has no top-level integer vocab_size, "
                            "which a new vocabulary must update (nested text/vision configs are not "
                            "supported with tokenizer_source / tokenizer)")
    tokenizers = {n: load_tokenizer(n, paths[n]) for n in names}
    vocabs: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for n, tok in tokenizers.items():
        v = dict(tok.get_vocab())
        size = _config_vocab_size(paths[n]) or len(v)
        beyond = sorted((i, t) for t, i in v.items() if i >= size)
        if beyond:
            raise MismatchError(f"model {n!r} ({paths[n]}): its tokenizer has {len(beyond)} token(s) with ids at "
                                f"or beyond its vocab_size {size} (first {beyond[0][1]!r} = {beyond[0][0]}): they "
                                "have no embedding row; remove them from the tokenizer or fix vocab_size")
        vocabs[n], sizes[n] = v, size
    if src == "base":
        out = load_tokenizer(base, paths[base])
    elif src == "union":
        out = _union(base, names, tokenizers, vocabs, paths[base])
    else:
        out = load_tokenizer(src, paths[src])
    tokens = dict(cfg.tokenizer.tokens or {}) if cfg.tokenizer is not None else {}
    existing = set(out.get_vocab())
    for t in tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = dict(out.get_vocab())
    n_out = len(vocab)
    if n_out and max(vocab.values()) >= n_out:
        raise MismatchError(f"the output tokenizer ({src}) has {n_out} tokens but ids up to "
                            f"{max(vocab.values())}: its ids are not contiguous, so it has no row layout")
    rows = n_out
    pad = cfg.tokenizer.pad_to_multiple_of if cfg.tokenizer is not None else None
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    perms = {n: [vocabs[n].get(t, -1) for t, _ in by_id] for n in names}
    vp = VocabPlan(source=src, tokenizer=out, vocab=vocab, rows=rows, perms=perms, orig_vocabs=vocabs,
                   vocab_sizes=sizes, tokens=tokens, dtype=DTYPES[cfg.dtype] if cfg.dtype else None)
    _check_tokens(cfg, vp, names)
    return vp


def _union(base: str, names: list[str], tokenizers: dict[str, Any], vocabs: dict[str, dict[str, int]],
           base_path: Path) -> Any:
    """mergekit's union: the base tokenizer (a fresh copy) plus, as added tokens, the other models'
    plain tokens it lacks, then every model's added tokens (first settings win)."""
    order = [base] + [n for n in names if n != base]
    added: dict[str, Any] = {}  # content -> AddedToken
    for n in order:
        for _i, info in sorted(tokenizers[n].added_tokens_decoder.items()):
            if info.content in added:
                if added[info.content] != info:
                    log.warning("token %r is added with different settings by several models; using the "
                                "first (model order of the config)", info.content)
                continue
            added[info.content] = info
    plain: dict[str, None] = {}
    for n in order:
        for t, _ in sorted(vocabs[n].items(), key=lambda kv: kv[1]):
            if t not in plain:
                plain[t] = None
    out = load_tokenizer(base, base_path)
    base_vocab = vocabs[base]
    new_plain = [t for t in plain if t not in added and t not in base_vocab]
    if new_plain:  # one call: ids in list order, as from one call per token
        out.add_tokens(new_plain)
    if added:
        out.add_tokens(list(added.values()))
    return out


def _check_tokens(cfg: MergeConfig, vp: VocabPlan, names: list[str]) -> None:
    for t, te in vp.tokens.items():
        where = ("tokenizer", "tokens", t, "source")
        s = te.source
        if isinstance(s, ModelTokenSource):
            if s.model not in vp.perms:
                raise cfg.error(f"token {t!r}: model {s.model!r} is not one of the models; known: "
                                + ", ".join(names), where + ("model",))
            if s.token is not None and s.token not in vp.orig_vocabs[s.model]:
                raise cfg.error(f"token {t!r}: model {s.model!r} has no token {s.token!r}", where + ("token",))
            if s.token_id is not None and s.token_id >= vp.vocab_sizes[s.model]:
                raise cfg.error(f"token {t!r}: token_id {s.token_id} is beyond model {s.model!r}'s "
                                f"vocab_size {vp.vocab_sizes[s.model]}", where + ("token_id",))
        elif isinstance(s, str):
            if s not in vp.perms:
                raise cfg.error(f"token {t!r}: source {s!r} is not one of the models, {{kind: zero}} or "
                                "{kind: model_token, model: NAME, token: TOKEN}; models: " + ", ".join(names), where)
            if vp.perms[s][vp.vocab[t]] < 0 and (te.force or any(vp.perms[n][vp.vocab[t]] < 0 for n in names)):
                raise cfg.error(f"token {t!r}: source model {s!r} has no token {t!r}; use "
                                f"{{kind: model_token, model: {s}, token: OTHER}} or {{kind: zero}}", where)


def _order(cfg: MergeConfig, part_index: int, models: list[str], base: str | None) -> list[str]:
    """The models of one tensor in mergekit's order: the config's list, the base last if unlisted."""
    if cfg.models is not None:
        listed = [m.model for m in cfg.models]
    else:
        assert cfg.slices is not None
        listed = [s.model for s in cfg.slices[part_index].sources]
    seen = list(dict.fromkeys(x for x in listed if x in models))
    if base is not None and base in models and base not in seen:
        seen.append(base)
    return seen + [x for x in models if x not in seen]


def vocab_entry(vp: VocabPlan, cfg: MergeConfig, part_index: int, entry_index: int, out_name: str,
                refs: list[tuple[str, str, TensorInfo]], base: str | None, infos: dict[str, ModelInfo]
                ) -> tuple[int, ...] | None:
    """If `out_name` is a vocabulary tensor, record its job and return its output shape; else None.
    Refuses inputs whose rows are not their model's vocabulary."""
    first = refs[0][2]
    if not any(h in out_name for h in VOCAB_HINTS) or len(first.shape) < 1:
        return None
    models = [m for m, _, _ in refs]
    for m, tname, info in refs:
        if info.shape[1:] != first.shape[1:]:
            raise MismatchError(f"tensor {tname!r}: shape {list(info.shape)} in model {m!r} differs from "
                                f"{list(first.shape)} in {models[0]!r} beyond the vocabulary rows")
        need = max(vp.perms[m], default=-1) + 1
        if info.shape[0] < need:
            raise MismatchError(f"tensor {tname!r} of model {m!r} has {info.shape[0]} rows but the model's "
                                f"tokenizer has ids up to {need - 1}; its rows are not its vocabulary")
        if info.dtype not in _TORCH:
            raise MismatchError(f"tensor {tname!r} of model {m!r} is {info.dtype}: the vocabulary rows can be "
                                "rearranged only for BF16, F16 or F32 tensors")
    for t, te in vp.tokens.items():
        s = te.source
        if isinstance(s, ModelTokenSource) and s.model not in models:
            raise cfg.error(f"token {t!r} takes its row from model {s.model!r}, which tensor {out_name!r} does "
                            "not merge (models: " + ", ".join(models) + ")", ("tokenizer", "tokens", t))
        if isinstance(s, str) and s not in models and (te.force or any(vp.perms[m][vp.vocab[t]] < 0 for m in models)):
            raise cfg.error(f"token {t!r} takes its row from model {s!r}, which tensor {out_name!r} does not "
                            "merge (models: " + ", ".join(models) + ")", ("tokenizer", "tokens", t))
        if s is None and (te.force or any(vp.perms[m][vp.vocab[t]] < 0 for m in models)):
            raise cfg.error(f"token {t!r} needs a 'source' (a model name, {{kind: zero}} or {{kind: model_token, "
                            "model: NAME, token: TOKEN}}): some model lacks it or it is forced",
                            ("tokenizer", "tokens", t))
    dtypes = {info.dtype for _, _, info in refs}
    identity = (all(vp.is_identity(m, info.shape[0]) for m, _, info in refs)
                and not any(te.force for te in vp.tokens.values())
                and (vp.dtype is None or dtypes == {vp.dtype}) and len(dtypes) == 1)
    vp.jobs.append(VocabJob(entry=entry_index, name=out_name, refs=[(m, t, i.file) for m, t, i in refs],
                            order=_order(cfg, part_index, models, base), base=base, identity=identity))
    return (vp.rows, *first.shape[1:])


# -- run time ----------------------------------------------------------------------------------------

def rearrange(vp: VocabPlan, job: VocabJob, tensors: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(model, its tensor in the output vocabulary) for each model, one at a time (`tensors`: model ->
    its input tensor, already cast to the config's dtype), with mergekit's rules and operation order.

    Rows a model has (and that are not forced) are gathered at once; the others come from the rules
    (module docs), evaluated only for the tokens that need them."""
    import torch

    models = job.order
    token_shape = tensors[models[0]].shape[1:]
    dtype = tensors[models[0]].dtype
    for m in models:
        dtype = torch.promote_types(dtype, tensors[m].dtype)
    n_vocab = len(vp.vocab)
    names = [""] * n_vocab
    for tok, tid in vp.vocab.items():
        names[tid] = tok
    perm = torch.tensor([vp.perms[m] for m in models], dtype=torch.long).reshape(len(models), n_vocab)
    present = perm >= 0
    count = present.sum(0)
    forced = torch.zeros(n_vocab, dtype=torch.bool)
    for t, c in vp.tokens.items():
        if c.force:
            forced[vp.vocab[t]] = True
    base_i = models.index(job.base) if job.base is not None and job.base in models else None

    def row(i: int, tid: int) -> Any:
        return tensors[models[i]][int(perm[i, tid])]

    defaults: dict[int, Any] = {}
    for tid in torch.nonzero((count < len(models)) | forced).reshape(-1).tolist():
        tok = names[tid]
        cfg = vp.tokens.get(tok)
        if cfg is None:
            n = int(count[tid])
            if n == 1:  # the one model that has it
                emb = row(int(torch.nonzero(present[:, tid])[0]), tid)
            elif n == 0:
                log.warning("token %r is in no input model: its rows are zero", tok)
                emb = torch.zeros(token_shape, dtype=tensors[models[0]].dtype)
            elif base_i is not None and bool(present[base_i, tid]):
                emb = row(base_i, tid)
            else:  # the mean over the models that have it, summed in the models' order
                emb = torch.zeros(token_shape, dtype=dtype)
                k = 0
                for i in range(len(models)):
                    if present[i, tid]:
                        emb = emb + row(i, tid)
                        k += 1
                emb /= k
        else:
            s = cfg.source
            if isinstance(s, ZeroSource):
                emb = torch.zeros(token_shape, dtype=tensors[models[0]].dtype)
            elif isinstance(s, ModelTokenSource):
                sid = s.token_id if s.token_id is not None else vp.orig_vocabs[s.model][s.token or ""]
                if not 0 <= sid < tensors[s.model].shape[0]:
                    raise MismatchError(f"token {tok!r}: row {sid} is beyond tensor {job.name!r} of model {s.model!r}")
                emb = tensors[s.model][sid]
            elif isinstance(s, str) and vp.perms[s][tid] >= 0:
                emb = tensors[s][vp.perms[s][tid]]
            else:  # refused while planning
                raise MismatchError(f"token {tok!r} has no row source for tensor {job.name!r}")
        defaults[tid] = emb
    for i, m in enumerate(models):
        new = torch.zeros((vp.rows, *token_shape), dtype=dtype)
        keep = present[i] & ~forced
        dst = torch.nonzero(keep).reshape(-1)
        new[dst] = tensors[m][perm[i, dst]].to(dtype)  # the model's own rows, one gather
        for tid in torch.nonzero(~keep).reshape(-1).tolist():
            new[tid] = defaults[tid]
        if vp.rows > n_vocab:
            new[n_vocab:] = torch.mean(new[:n_vocab], dim=0)
        yield m, new


def write_vocab_inputs(vp: VocabPlan, plan: dict[str, Any], paths: dict[str, Path], work: Path
                       ) -> dict[str, Any]:
    """Write each model's rearranged vocabulary tensors under `work` and return the plan pointing at
    them (one tensor of all models in memory at a time)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    plan = dict(plan)
    plan["tensors"] = copy.deepcopy(plan["tensors"])  # the caller's plan keeps its references
    models_list = list(plan["models"])
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IoError(f"{work}: cannot create the temporary directory for vocabulary tensors: {e}") from None
    for k, job in enumerate(vp.jobs):
        if job.identity:
            continue
        tensors: dict[str, Any] = {}
        for m, tname, fname in job.refs:
            with safe_open(str(paths[m] / fname), framework="pt") as f:
                x = f.get_tensor(tname)
            if vp.dtype is not None:
                x = x.to(getattr(torch, _TORCH[vp.dtype]))
            tensors[m] = x
        tnames = {m: t for m, t, _ in job.refs}
        entry = plan["tensors"][job.entry]
        for m, tensor in rearrange(vp, job, tensors):  # one output in memory at a time
            d = work / f"{k}-{list(paths).index(m)}"
            try:
                d.mkdir(exist_ok=True)
                save_file({job.name: tensor.contiguous()}, str(d / "model.safetensors"), metadata={"format": "pt"})
            except OSError as e:
                raise IoError(f"{d}: cannot write a rearranged vocabulary tensor: {e}") from None
            models_list.append(str(d))
            idx = len(models_list) - 1
            for ref in ([entry["base"]] if entry.get("base") else []) + entry["sources"]:
                if ref["model"] == plan["models"].index(str(paths[m])) and ref["tensor"] == tnames[m]:
                    ref["model"], ref["tensor"] = idx, job.name
            del tensor
        del tensors
    plan["models"] = models_list
    return plan


def save_tokenizer(tokenizer: Any, out: Path, chat_template: str | None) -> None:
    """Write a tokenizer as mergekit does (transformers' save_pretrained), with the chat template."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(out))
    except OSError as e:
        raise IoError(f"{out}: cannot write the tokenizer: {e}") from None


def resolve_chat_template(cfg: MergeConfig, paths: dict[str, Path]) -> str | None:
    """The template text `chat_template` asks for: a named template, the given Jinja text, or for
    `auto` the template most input models share (ties: the first in the config's order); None when
    `auto` finds none."""
    value = cfg.chat_template
    if value is None:
        return None
    from finrecipe.merge.chat_templates import NAMES, is_name, template_text

    if value == "auto":
        found: list[str] = []
        for n, p in paths.items():
            try:
                tok = load_tokenizer(n, p)
            except MismatchError as e:
                log.warning("chat_template auto: %s", e)
                continue
            t = tok.chat_template
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        if not found:
            return None
        counts = {t: found.count(t) for t in dict.fromkeys(found)}
        best = max(counts.values())
        return next(t for t, c in counts.items() if c == best)
    if is_name(value):
        if value not in NAMES:
            raise ConfigError(f"unknown chat template {value!r}")
        return template_text(value)
    return value
