"""tokenizer_source / tokenizer: / chat_template: the output vocabulary, rows by token, refusals.

The models (bench/parity/tokenizer_cases.py, built locally) have different word-level tokenizers:
base (30 tokens, 32 rows), instruct (+2 special tokens), cpt (its own ids and 8 finance words),
far (the base's words in reverse order + 2 words); `tok-tied` ties lm_head to embed_tokens.
mergekit parity of the same cases: `bench/parity/run.py --only tok-`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_state_dict
from finrecipe.errors import ConfigError, MismatchError
from finrecipe.merge import MergeConfig, run_merge, validate_merge
from finrecipe.merge.chat_templates import NAMES, template_text
from finrecipe.merge.tokenizer import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "parity"))
import tokenizer_cases  # noqa: E402

EMB = "model.embed_tokens.weight"


@pytest.fixture(scope="session")
def tok_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tok_models")
    tokenizer_cases.build(root)
    return {f: {v: root / f / v for v in ("base", "instruct", "cpt", "far")} for f in tokenizer_cases.FAMILIES}


def vocab(d: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(d)).get_vocab())


def cfg(ms: dict[str, Path], **extra: Any) -> MergeConfig:
    d: dict[str, Any] = {"merge_method": "linear", "dtype": "float32",
                         "models": [{"model": str(ms["instruct"]), "parameters": {"weight": 1.0}},
                                    {"model": str(ms["cpt"]), "parameters": {"weight": 3.0}}]}
    d.update(extra)
    return MergeConfig.from_dict(d)


def test_union_rows_follow_tokens(tok_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    ms = tok_models["tok-llama"]
    res = run_merge(cfg(ms, tokenizer_source="union"), tmp_path / "out")
    out = load_state_dict(res.out_dir)
    vo, vi, vc = vocab(res.out_dir), vocab(ms["instruct"]), vocab(ms["cpt"])
    # union: instruct's (the first model's) 32 tokens keep their ids, cpt's 9 new words follow in id order
    assert all(vo[t] == i for t, i in vi.items())
    new = sorted((t for t in vc if t not in vi), key=vc.__getitem__)
    assert [vo[t] for t in new] == list(range(32, 41)) and len(new) == 9
    assert json.loads((res.out_dir / "config.json").read_text())["vocab_size"] == 41
    ti, tc = load_state_dict(ms["instruct"]), load_state_dict(ms["cpt"])
    for name in (EMB, "lm_head.weight"):
        assert out[name].shape == (41, 32)
        for t, r in vo.items():
            a = ti[name][vi[t]].float() if t in vi else None
            c = tc[name][vc[t]].float() if t in vc else None
            # a model lacking a token takes the row of the one model that has it
            want = (0.25 * a + 0.75 * c) if a is not None and c is not None else (a if a is not None else c)
            assert want is not None
            torch.testing.assert_close(out[name][r], want, rtol=0, atol=1e-6)
    # the temporary per-model vocabulary files are gone, the returned plan still names the inputs;
    # the tokenizer round-trips
    assert not any(p.name.startswith(".finrecipe") for p in res.out_dir.iterdir())
    plan = res.info.plan
    emb = next(t for t in plan["tensors"] if t["name"] == EMB)
    assert [plan["models"][s["model"]] for s in emb["sources"]] == [str(ms["instruct"]), str(ms["cpt"])]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(res.out_dir))
    assert tok("w5 bond <|im_end|>")["input_ids"] == [vo["w5"], vo["bond"], vo["<|im_end|>"]]


def test_default_rules_base_then_mean(tok_models: dict[str, dict[str, Path]]) -> None:
    """Rows for a token a model lacks: the only model that has it; else the base's; else the mean."""
    ms = tok_models["tok-llama"]
    c = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": str(ms["base"]),
                               "tokenizer_source": "union",
                               "models": [{"model": str(ms[v]), "parameters": {"weight": 1.0}}
                                          for v in ("instruct", "cpt", "far")]})
    info = validate_merge(c)
    vp = info.vocab
    assert vp is not None
    job = next(j for j in vp.jobs if j.name == EMB)
    assert not job.identity
    names = {v: str(ms[v]) for v in ms}
    # rows that name their model and token: value = 1000 * model number + own token id
    tensors = {names[v]: torch.stack([torch.full((2,), 1000.0 * k + i) for i in range(rows)])
               for k, (v, rows) in enumerate([("base", 32), ("instruct", 32), ("cpt", 29), ("far", 32)])}
    new = dict(rearrange(vp, job, tensors))
    vb, vi, vc, vf = (vocab(ms[v]) for v in ("base", "instruct", "cpt", "far"))
    far_row = new[names["far"]]
    # "<|im_start|>": only instruct has it -> instruct's row in every model
    assert far_row[vp.vocab["<|im_start|>"], 0] == 1000 + vi["<|im_start|>"]
    # "w5": far has it itself
    assert far_row[vp.vocab["w5"], 0] == 3000 + vf["w5"]
    # "bond": only cpt -> cpt's row, in far's tensor too
    assert far_row[vp.vocab["bond"], 0] == 2000 + vc["bond"]
    # "w25": base, instruct and far have it, cpt lacks it -> the base's row
    assert "w25" not in vc and new[names["cpt"]][vp.vocab["w25"], 0] == 0 + vb["w25"]
    # "gamma": far only
    assert new[names["base"]][vp.vocab["gamma"], 0] == 3000 + vf["gamma"]
    # "alpha": cpt and far, not the base -> their mean, in every model (base too)
    assert new[names["base"]][vp.vocab["alpha"], 0] == ((2000 + vc["alpha"]) + (3000 + vf["alpha"])) / 2
    # without a base model in the tensor's models: the mean of the models that have the token
    job.base = None
    new = dict(rearrange(vp, job, tensors))
    want = ((0 + vb["w25"]) + (1000 + vi["w25"]) + (3000 + vf["w25"])) / 3
    assert float(new[names["cpt"]][vp.vocab["w25"], 0]) == pytest.approx(want)


def test_tokens_section_and_padding(tok_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    ms = tok_models["tok-llama"]
    tokens = {"<|im_end|>": {"source": {"kind": "zero"}, "force": True},
              "bond": {"source": str(ms["cpt"]), "force": True},
              "w5": {"source": {"kind": "model_token", "model": str(ms["cpt"]), "token_id": 4}, "force": True},
              "<extra>": {"source": {"kind": "model_token", "model": str(ms["instruct"]), "token": "w7"}}}
    c = cfg(ms, tokenizer={"source": "base", "pad_to_multiple_of": 16, "tokens": tokens},
            base_model=str(ms["instruct"]))
    res = run_merge(c, tmp_path / "out")
    vo = vocab(res.out_dir)
    # the base's (instruct's) 32 tokens, then the configured tokens it lacks, in config order
    assert len(vo) == 34 and vo["bond"] == 32 and vo["<extra>"] == 33
    assert json.loads((res.out_dir / "config.json").read_text())["vocab_size"] == 48
    out = load_state_dict(res.out_dir)[EMB]
    ti, tc = load_state_dict(ms["instruct"])[EMB].float(), load_state_dict(ms["cpt"])[EMB].float()
    vc, vi = vocab(ms["cpt"]), vocab(ms["instruct"])
    assert out.shape == (48, 32)
    assert torch.all(out[vo["<|im_end|>"]] == 0)
    torch.testing.assert_close(out[vo["bond"]], tc[vc["bond"]], rtol=0, atol=1e-6)  # cpt's row for both
    torch.testing.assert_close(out[vo["w5"]], tc[4], rtol=0, atol=1e-6)  # forced: cpt's row 4 for both
    torch.testing.assert_close(out[vo["<extra>"]], ti[vi["w7"]], rtol=0, atol=1e-6)
    # padding rows: each model's mean row, merged
    forced = {"<|im_end|>": torch.zeros(32), "bond": tc[vc["bond"]], "w5": tc[4], "<extra>": ti[vi["w7"]]}
    mi, mc = torch.zeros(34, 32), torch.zeros(34, 32)
    for t, r in vo.items():
        own_i = ti[vi[t]] if t in vi else tc[vc[t]] if t in vc else None
        own_c = tc[vc[t]] if t in vc else ti[vi[t]] if t in vi else None
        mi[r] = forced[t] if t in forced else own_i
        mc[r] = forced[t] if t in forced else own_c
    want = 0.25 * mi.mean(0) + 0.75 * mc.mean(0)
    torch.testing.assert_close(out[40], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[47], want, rtol=0, atol=1e-5)


def test_tied_embeddings_union_loads(tok_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    ms = tok_models["tok-tied"]
    c = MergeConfig.from_dict({"merge_method": "ties", "base_model": str(ms["base"]), "tokenizer_source": "union",
                               "models": [{"model": str(ms["far"]), "parameters": {"weight": 1.0, "density": 0.5}},
                                          {"model": str(ms["cpt"]), "parameters": {"weight": 1.0, "density": 0.5}}]})
    res = run_merge(c, tmp_path / "out")
    out = load_state_dict(res.out_dir)
    assert "lm_head.weight" not in out and out[EMB].shape == (40, 32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(res.out_dir))
    tok = AutoTokenizer.from_pretrained(str(res.out_dir))
    ids = tok("alpha bond w3", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, 3, 40)


def test_identity_vocabulary_is_merged_directly(related_models: Any, tmp_path: Path) -> None:
    """Models sharing one tokenizer: `tokenizer_source: base` re-saves the tokenizer, no rearranging."""
    ms = related_models("llama", "float32", shard_bytes=20_000)
    d = {"merge_method": "task_arithmetic", "base_model": str(ms["base"]), "tokenizer_source": "base",
         "models": [{"model": str(ms["m1"]), "parameters": {"weight": 1.0}}]}
    info = validate_merge(MergeConfig.from_dict(d))
    assert info.vocab is not None and info.vocab.jobs and all(j.identity for j in info.vocab.jobs)
    res = run_merge(MergeConfig.from_dict(d), tmp_path / "out")
    assert vocab(res.out_dir) == vocab(ms["base"])
    # sharded inputs: rearranging reads each tensor from its own shard
    d["tokenizer"] = {"source": "base", "pad_to_multiple_of": 96}
    del d["tokenizer_source"]
    res = run_merge(MergeConfig.from_dict(d), tmp_path / "out2")
    a, b = load_state_dict(res.out_dir)[EMB], load_state_dict(ms["m1"])[EMB]
    n = b.shape[0]
    assert a.shape[0] == 192 and n == 128
    base = load_state_dict(ms["base"])[EMB]
    torch.testing.assert_close(a[:n], b, rtol=0, atol=1e-6)  # base + (m1 - base)
    torch.testing.assert_close(a[n:], (base.mean(0) + (b.mean(0) - base.mean(0))).expand(a.shape[0] - n, -1),
                               rtol=0, atol=1e-5)


def test_chat_templates(tok_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ms = tok_models["tok-llama"]
    assert set(NAMES) == {"alpaca", "chatml", "exaone", "llama3", "mistral"}
    same_rows = {"base": ms["base"], "instruct": ms["base"], "cpt": ms["instruct"]}  # 32 rows each
    res = run_merge(cfg(same_rows, chat_template="llama3"), tmp_path / "named")
    # no vocabulary change: the donor's (first model's) tokenizer, re-saved with the template
    assert vocab(res.out_dir) == vocab(ms["base"])
    assert AutoTokenizer.from_pretrained(str(res.out_dir)).chat_template == template_text("llama3")
    # auto: the template most models share (instruct and far: chatml; base and cpt: none)
    c = MergeConfig.from_dict({"merge_method": "linear", "chat_template": "auto", "tokenizer_source": "union",
                               "models": [{"model": str(ms[v]), "parameters": {"weight": 1.0}}
                                          for v in ("cpt", "far", "instruct")]})
    res = run_merge(c, tmp_path / "auto")
    assert AutoTokenizer.from_pretrained(str(res.out_dir)).chat_template == tokenizer_cases.CHATML
    inline = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    res = run_merge(cfg(same_rows, chat_template=inline), tmp_path / "inline")
    tok = AutoTokenizer.from_pretrained(str(res.out_dir))
    assert tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False) == "w5|"


@pytest.mark.parametrize("extra, match", [
    ({"chat_template": "chatm"}, "unknown chat template 'chatm' \\(did you mean 'chatml'\\?\\)"),
    ({"chat_template": "{x}"}, "neither a known name nor a Jinja template"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "greater than 0"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "a", "token": "b", "token_id": 1}}}}},
     "exactly one of 'token' or 'token_id'"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "mean"}}}}}, "tokenizer.tokens.x.source"),
    ({"tokenizer": {"source": "union", "sorce": 1}}, "sorce"),
])
def test_config_refusals(tok_models: dict[str, dict[str, Path]], extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg(tok_models["tok-llama"], **extra)


def test_plan_refusals(tok_models: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    ms = tok_models["tok-llama"]
    with pytest.raises(ConfigError, match="tokenizer source 'nowhere' is not one of the models"):
        validate_merge(cfg(ms, tokenizer_source="nowhere"))
    with pytest.raises(ConfigError, match="token 'zzz' needs a 'source'"):
        validate_merge(cfg(ms, tokenizer={"tokens": {"zzz": {}}}))
    with pytest.raises(ConfigError, match="model 'elsewhere' is not one of the models"):
        validate_merge(cfg(ms, tokenizer={"tokens": {"zzz": {"source": {"kind": "model_token", "model": "elsewhere",
                                                                         "token": "w3"}}}}))
    with pytest.raises(ConfigError, match="has no token 'nope'"):
        validate_merge(cfg(ms, tokenizer={"tokens": {"zzz": {"source": {"kind": "model_token",
                                                                         "model": str(ms["cpt"]), "token": "nope"}}}}))
    with pytest.raises(ConfigError, match="source model .* has no token 'bond'"):
        validate_merge(cfg(ms, tokenizer={"tokens": {"bond": {"source": str(ms["instruct"])}}}))
    # different vocabularies without tokenizer_source: refused, pointing at the option
    with pytest.raises(MismatchError, match="vocabulary sizes differ.*set tokenizer_source"):
        validate_merge(cfg(ms))
    # a model without tokenizer files
    bare = tmp_path / "bare"
    shutil.copytree(ms["cpt"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    c = MergeConfig.from_dict({"merge_method": "linear", "tokenizer_source": "union",
                               "models": [{"model": str(ms["instruct"]), "parameters": {"weight": 1.0}},
                                          {"model": str(bare), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match="tokenizer cannot be loaded"):
        validate_merge(c)
    # a chat template for a donor without tokenizer files: refused while planning
    c = MergeConfig.from_dict({"merge_method": "linear", "chat_template": "chatml",
                               "models": [{"model": str(bare), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match="chat_template is set but model .* has no tokenizer files"):
        validate_merge(c)
    # a tokenizer with ids beyond the model's vocab_size
    short = tmp_path / "short"
    shutil.copytree(ms["far"], short)
    conf = json.loads((short / "config.json").read_text())
    conf["vocab_size"] = 20
    (short / "config.json").write_text(json.dumps(conf))
    c = MergeConfig.from_dict({"merge_method": "linear", "tokenizer_source": "union",
                               "models": [{"model": str(ms["instruct"]), "parameters": {"weight": 1.0}},
                                          {"model": str(short), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match="ids at or beyond its vocab_size 20"):
        validate_merge(c)
    # an output config whose vocab_size is nested (multimodal): refused, not left stale
    nested = tmp_path / "nested"
    shutil.copytree(ms["instruct"], nested)
    conf = json.loads((nested / "config.json").read_text())
    conf["text_config"] = {"vocab_size": conf.pop("vocab_size")}
    (nested / "config.json").write_text(json.dumps(conf))
    c = MergeConfig.from_dict({"merge_method": "linear", "tokenizer_source": "union",
                               "models": [{"model": str(nested), "parameters": {"weight": 1.0}},
                                          {"model": str(ms["cpt"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match="no top-level integer vocab_size"):
        validate_merge(c)


def _mergekit_templates() -> Path:
    """mergekit 0.1.5's named chat templates, read from its own venv (made here if missing, as the parity
    test does: `make test` may run this file first)."""
    import run as parity_run  # bench/parity/run.py

    py = parity_run.ensure_mergekit()
    out = subprocess.run([str(py), "-c", "import mergekit, os; print(os.path.dirname(mergekit.__file__))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out) / "_data" / "chat_templates"


@pytest.mark.skipif(os.environ.get("FINRECIPE_SKIP_PARITY") == "1",
                    reason="FINRECIPE_SKIP_PARITY=1 (the mergekit venv needs PyPI once)")
@pytest.mark.parametrize("name", NAMES)
def test_named_templates_render_as_mergekits(name: str) -> None:
    # finrecipe's own template text; the oracle is mergekit 0.1.5's template of that name, read from its venv
    ref_dir = _mergekit_templates()
    ref = (ref_dir / f"{name}.jinja").read_text(encoding="utf-8")
    ours = template_text(name)
    assert ours != ref
    assert tokenizer_cases.render_problem(ours, ref) is None
    # the comparison is not vacuous: another template renders differently
    other = template_text("chatml" if name != "chatml" else "llama3")
    assert tokenizer_cases.render_problem(other, ref) is not None
