"""Parity cases for mergekit's tokenizer surface: tokenizer_source, the `tokenizer:` section, chat templates.

Models (built by `build(out)`, called from models.py): two families whose four variants have
*different* tokenizers, built locally with the `tokenizers` library (word-level, whitespace split):

  base      <unk> <s> </s> w3..w29 (30 tokens) but 32 embedding rows (vocab_size 32: padded)
  instruct  the base's 30 tokens + special <|im_start|> <|im_end|> (32), with a chatml template
  cpt       <unk> <s> </s>, w3..w19 and 8 finance words, interleaved (ids differ from the base's), alpha
  far       the base's tokens in another order + 2 words of its own, and a chatml template

`tok-llama` has a separate lm_head, `tok-tied` (llama too) tied word embeddings. Layer tensors are the base's
plus small noise (bf16), embedding rows are random per model.

`check_tokenizer` is check.py's tokenizer step: the output vocabularies (token -> id, added tokens
and their settings), tokenizer.json's other sections, the chat template, config.json's vocab_size;
then finrecipe's vocabulary rows are put in mergekit's token order so that the tensors compare
element by element. mergekit 0.1.5 appends a union's new plain tokens in hash-map order (different
ids from run to run), so for those (only those) ids may differ: the token sets must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TOKENIZER_KEYS = {"tokenizer_source", "tokenizer", "chat_template"}
CHATML = ("{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
# Conversations on which two chat templates must render equal strings (or both fail) to count as the same
# template: finrecipe writes its own text for a named template, so parity is checked by rendering.
_S = {"role": "system", "content": "  You are terse.\n"}
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "hi"}],
    [_S, {"role": "user", "content": "hi there "}],
    [{"role": "user", "content": " q1"}, {"role": "assistant", "content": "a1 "}, {"role": "user", "content": "q2"}],
    [_S, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
     {"role": "assistant", "content": "a2\n"}],
    [{"role": "assistant", "content": "only assistant"}],
    [{"role": "user", "content": "q"}, {"role": "user_context", "content": " ctx\n"}, {"role": "assistant", "content": "r"}],
    [_S], [_S, _S, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": " "}], [{"role": "user", "content": ""}],
]


def render_problem(ours: str | None, ref: str | None) -> str | None:
    """None when the two chat templates render every conversation of CONVERSATIONS the same (with and
    without the generation prompt; a failure counts as equal only to a failure), else the first difference."""
    if ours is None or ref is None:
        return None if ours == ref else f"chat template written by {'finrecipe' if ours else 'mergekit'} only"
    from transformers.utils.chat_template_utils import _compile_jinja_template

    def render(t: Any, conv: list[dict[str, str]], gen: bool) -> str:
        try:
            return str(t.render(messages=conv, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>"))
        except Exception:  # noqa: BLE001 - a template may refuse a conversation; both must then refuse it
            return "<fails>"
    a, b = _compile_jinja_template(ours), _compile_jinja_template(ref)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            x, y = render(a, conv, gen), render(b, conv, gen)
            if x != y:
                return f"chat templates render differently (generation prompt {gen}): {x[:60]!r} vs {y[:60]!r}"
    return None


FIN = ["bond", "equity", "yield", "coupon", "spread", "hedge", "ebitda", "dividend"]
FAMILIES = {
    "tok-llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "tok-tied": dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
SPECIAL = ["<unk>", "<s>", "</s>"]


def _vocabs() -> dict[str, tuple[list[str], list[str], int, str | None]]:
    """variant -> (plain tokens in id order, added special tokens, vocab_size, chat template)."""
    words = [f"w{i}" for i in range(3, 30)]
    cpt = list(SPECIAL)
    for i, w in enumerate([f"w{i}" for i in range(3, 20)]):
        cpt.append(w)
        if i % 2 == 0 and i // 2 < len(FIN):
            cpt.append(FIN[i // 2])
    cpt.append("alpha")  # also far's: in two models but not the base (its rows: their mean)
    far = SPECIAL + list(reversed(words)) + ["alpha", "gamma"]
    return {"base": (SPECIAL + words, [], 32, None),
            "instruct": (SPECIAL + words, ["<|im_start|>", "<|im_end|>"], 32, CHATML),
            "cpt": (cpt, [], len(cpt), None),
            "far": (far, [], len(far), CHATML)}


def _tokenizer(plain: list[str], added: list[str], template: str | None, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(plain)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        fast.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in added]})
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))


def build(out: Path) -> None:
    """Build both families under out/<family>/<variant>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for family, spec in FAMILIES.items():
        spec = dict(spec)
        mt = str(spec.pop("model_type"))
        gen = torch.Generator().manual_seed(sum(map(ord, family)))
        base_state: dict[str, torch.Tensor] | None = None
        for variant, (plain, added, vsize, template) in _vocabs().items():
            cfg = AutoConfig.for_model(mt, vocab_size=vsize, bos_token_id=1, eos_token_id=2, **spec)
            torch.manual_seed(99)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            state = model.state_dict()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "embed_tokens" in name or "lm_head" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                    elif base_state is not None:
                        p.copy_(base_state[name] + 0.01 * torch.randn(p.shape, generator=gen))
            if base_state is None:
                base_state = {k: v.detach().clone() for k, v in state.items()}
            d = out / family / variant
            model.to(torch.bfloat16).save_pretrained(d)
            _tokenizer(plain, added, template, d)


def m(variant: str, **params: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"model": f"@{variant}"}
    if params:
        d["parameters"] = params
    return d


def cases(Case: Any) -> list[Any]:
    """The tokenizer cases, as matrix.Case objects (the class is passed in to avoid an import cycle)."""

    def ta(**extra: Any) -> dict[str, Any]:
        return {"merge_method": "task_arithmetic", "base_model": "@base",
                "models": [m("instruct", weight=0.6), m("cpt", weight=0.4)], **extra}

    return [
        Case("tok-union", "tok-llama", "exact", ta(tokenizer_source="union"), ci=True,
             note="issue 10: union vocabulary, rows by token"),
        Case("tok-union-tied", "tok-tied", "exact", ta(tokenizer_source="union")),
        Case("tok-base-padded", "tok-llama", "exact", ta(tokenizer_source="base"),
             note="base has 32 rows for 30 tokens: the output has 30"),
        Case("tok-model-source", "tok-llama", "exact", ta(tokenizer_source="@cpt")),
        Case("tok-section-tokens", "tok-llama", "exact", ta(tokenizer={
            "source": "union", "pad_to_multiple_of": 16,
            "tokens": {"<|im_start|>": {"source": {"kind": "model_token", "model": "@base", "token": "<s>"}},
                       "<|im_end|>": {"source": {"kind": "zero"}, "force": True},
                       "bond": {"source": "@cpt", "force": True},
                       "w5": {"source": {"kind": "model_token", "model": "@cpt", "token_id": 4}, "force": True},
                       "<extra>": {"source": {"kind": "model_token", "model": "@instruct", "token": "w7"}}}})),
        Case("tok-union-3-chatml", "tok-llama", "exact",
             {"merge_method": "task_arithmetic", "base_model": "@base",
              "models": [m("instruct", weight=0.5), m("cpt", weight=0.3), m("far", weight=0.2)],
              "tokenizer": {"source": "union"}, "chat_template": "chatml"},
             note="alpha: in cpt and far only, its rows are their mean"),
        Case("tok-chat-auto", "tok-tied", "exact",
             {"merge_method": "task_arithmetic", "base_model": "@base",
              "models": [m("far", weight=0.5), m("instruct", weight=0.5)],
              "tokenizer_source": "union", "chat_template": "auto"}),
        Case("tok-slices-passthrough", "tok-llama", "exact",
             {"merge_method": "passthrough", "base_model": "@base", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": "@instruct", "layer_range": [0, 1]}]},
                         {"sources": [{"model": "@cpt", "layer_range": [1, 2]}]}]},
             note="embed_tokens from instruct, lm_head from cpt: tokens a tensor's one model lacks are zero"),
        Case("tok-template-name-only", "tok-llama", "exact",
             {"merge_method": "task_arithmetic", "base_model": "@base",
              "models": [m("instruct", weight=1.0)], "chat_template": "llama3"},
             note="no vocabulary change: the donor's tokenizer re-saved with the named template"),
    ]


# -- checking --------------------------------------------------------------------------------------------
def _read(d: Path, name: str) -> Any:
    p = d / name
    if not p.is_file():
        return None
    return json.loads(p.read_text()) if name.endswith(".json") else p.read_text()


def _added_key(e: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(e.get(k) for k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special"))


def check_tokenizer(ours_dir: Path, ref_dir: Path, ours: dict[str, torch.Tensor]
                    ) -> tuple[str | None, dict[str, torch.Tensor], str]:
    """(problem or None, finrecipe's tensors with vocabulary rows in mergekit's token order, a note)."""
    from transformers import AutoTokenizer

    a, b = _read(ours_dir, "tokenizer.json"), _read(ref_dir, "tokenizer.json")
    if (a is None) != (b is None):
        return (f"tokenizer.json written by {'finrecipe' if a is not None else 'mergekit'} only", ours, "")
    if a is None:
        return None, ours, "no tokenizer written (as mergekit)"
    for key in sorted(set(a) | set(b)):
        if key == "added_tokens":
            continue
        if a.get(key) != b.get(key):
            return f"tokenizer.json section {key!r} differs", ours, ""
    if sorted(map(_added_key, a["added_tokens"])) != sorted(map(_added_key, b["added_tokens"])):
        return "tokenizer.json added tokens differ (content or settings)", ours, ""
    ta, tb = AutoTokenizer.from_pretrained(str(ours_dir)), AutoTokenizer.from_pretrained(str(ref_dir))
    va, vb = ta.get_vocab(), tb.get_vocab()
    if set(va) != set(vb):
        return (f"vocabularies differ: only finrecipe {sorted(set(va) - set(vb))[:4]}, only mergekit "
                f"{sorted(set(vb) - set(va))[:4]}"), ours, ""
    same_template_text = ta.chat_template == tb.chat_template
    if not same_template_text:
        problem = render_problem(ta.chat_template, tb.chat_template)
        if problem:
            return problem, ours, ""
    ca, cb = _read(ours_dir, "config.json"), _read(ref_dir, "config.json")
    if ca.get("vocab_size") != cb.get("vocab_size"):
        return f"config.json vocab_size {ca.get('vocab_size')} vs mergekit {cb.get('vocab_size')}", ours, ""
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        x, y = _read(ours_dir, f), _read(ref_dir, f)
        if f == "chat_template.jinja" and not same_template_text:
            continue  # compared by rendering above
        if f == "tokenizer_config.json" and x is not None and y is not None:
            x = {**x, "added_tokens_decoder": sorted(v["content"] for v in x.get("added_tokens_decoder", {}).values())}
            y = {**y, "added_tokens_decoder": sorted(v["content"] for v in y.get("added_tokens_decoder", {}).values())}
            if not same_template_text:
                x.pop("chat_template", None)
                y.pop("chat_template", None)
        if x != y:
            return f"{f} differs", ours, ""
    moved = sum(va[t] != vb[t] for t in va)
    same_bytes = (ours_dir / "tokenizer.json").read_bytes() == (ref_dir / "tokenizer.json").read_bytes()
    note = ("tokenizer.json identical" if same_bytes
            else f"same tokens; {moved} appended tokens have other ids (mergekit's hash order)")
    if not same_template_text:
        note += f"; chat template: own text, renders as mergekit's on {len(CONVERSATIONS)} conversations"
    if not moved:
        return None, ours, note
    rows = int(ca["vocab_size"])
    src = list(range(rows))  # mergekit's row r holds the token that finrecipe has at row src[r]
    for t, i in vb.items():
        src[i] = va[t]
    idx = torch.tensor(src)
    out = {n: (x.index_select(0, idx) if x.ndim >= 1 and x.shape[0] == rows and
               any(h in n for h in ("embed_tokens", "lm_head")) else x) for n, x in ours.items()}
    return None, out, note
