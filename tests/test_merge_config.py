"""mergekit config validation and plan resolution (no tensor data is read here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_state_dict, save_state_dict
from finrecipe.errors import ConfigError, MismatchError, RecipeError
from finrecipe.merge import MergeConfig, load_merge_config, read_model, run_merge, validate_merge
from finrecipe.merge.plan import gradient


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(text)
    return p


def err(tmp_path: Path, text: str) -> RecipeError:
    with pytest.raises(RecipeError) as ei:
        load_merge_config(write(tmp_path, text))
    return ei.value


def test_mergekit_config_parses_unchanged(tmp_path: Path) -> None:
    cfg = load_merge_config(write(tmp_path, """\
slices:
  - sources:
      - model: a
        layer_range: [0, 32]
      - model: b
        layer_range: [0, 32]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
tokenizer_source: base
"""))
    assert cfg.merge_method == "slerp" and cfg.model_names() == ["a", "b"]
    cfg = load_merge_config(write(tmp_path, """\
models:
  - model: base
  - model: instruct
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
merge_method: ties
base_model: base
parameters: {normalize: true, int8_mask: true}
dtype: float16
"""))
    assert cfg.model_names() == ["base", "instruct"]


@pytest.mark.parametrize(("text", "where", "words"), [
    ("merge_methd: ties\nmodels: [{model: a}]\n", "merge.yml:1:1", ["merge_methd", "did you mean 'merge_method'"]),
    ("merge_method: tie\nbase_model: a\nmodels: [{model: b}]\n", "merge.yml:1:", ["'tie'", "did you mean 'ties'"]),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      densty: 0.5\n      weight: 1\n",
     "merge.yml:6:7", ["models[0].parameters.densty", "did you mean 'density'"]),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: 1.5}\n",
     "merge.yml:5:", ["density", "[0, 1]"]),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: abc}\n",
     "merge.yml:5:", ["models[0].parameters.weight"]),
    ("merge_method: linear\nmodels: [{model: a}]\nslices: []\n", "merge.yml", ["exactly one of 'models' or 'slices'"]),
    ("merge_method: ties\nmodels: [{model: a}]\n", "merge.yml", ["needs a 'base_model'"]),
    ("merge_method: slerp\nbase_model: a\nmodels:\n  - model: b\n    parameters: {t: 0.5}\n", "merge.yml:5:",
     ["'t' applies to the whole merge"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: bfloat61\n", "merge.yml:3:",
     ["did you mean 'bfloat16'"]),
    ("merge_method: task_arithmetic\nbase_model: a\nmodels: [{model: b, parameters: {densty: 1}}]\n",
     "merge.yml:3:", ["ties"]),
    ("merge_method: linear\nmodels: [{model: a, extra: 1}]\n", "merge.yml:2:", ["unknown key 'extra'"]),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: [{filter: mlp, valu: 1}]}\n",
     "merge.yml:5:", ["weight[0].valu", "did you mean 'value'"]),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: abc}\n",
     "merge.yml:5:18", ["a list of numbers (a gradient", "got 'abc'"]),
])
def test_bad_configs_name_the_key(tmp_path: Path, text: str, where: str, words: list[str]) -> None:
    e = err(tmp_path, text)
    msg = str(e)
    assert isinstance(e, ConfigError)
    assert where in msg, msg
    for w in words:
        assert w in msg, msg


def test_gradient_interpolation() -> None:
    assert gradient([0.0, 1.0], 0.25) == 0.25
    assert gradient([0.0, 1.0, 0.5], 0.75) == pytest.approx(0.75)
    assert gradient([0.0, 1.0, 0.5], 1.0) == 0.5
    assert gradient([0.3], 0.9) == 0.3


def _cfg(ms: dict[str, Path], **kw: Any) -> MergeConfig:
    d: dict[str, Any] = {"merge_method": "ties", "base_model": str(ms["base"]),
                         "models": [{"model": str(ms["m1"]), "parameters": {"weight": 0.5}},
                                    {"model": str(ms["m2"])}],
                         "parameters": {"weight": 1.0, "density": [{"filter": "mlp", "value": [0.2, 1.0]},
                                                                    {"value": 0.7}]}}
    d.update(kw)
    return MergeConfig.from_dict(d)


def test_plan_resolves_precedence_gradients_and_filters(related_models: Any) -> None:
    ms = related_models("llama", "bfloat16")
    info = validate_merge(_cfg(ms, out_dtype="float16"))
    plan = info.plan
    names = [t["name"] for t in plan["tensors"]]
    assert names == list(read_model(ms["base"]).tensors)  # the base's order
    by = {t["name"]: t for t in plan["tensors"]}
    up1 = by["model.layers.1.mlp.up_proj.weight"]
    assert [s["params"]["weight"] for s in up1["sources"]] == [0.5, 1.0]  # model > global
    assert up1["sources"][0]["params"]["density"] == pytest.approx(0.6)  # gradient at t = 0.5
    assert by["model.layers.2.mlp.up_proj.weight"]["sources"][0]["params"]["density"] == 1.0
    assert by["model.layers.0.self_attn.q_proj.weight"]["sources"][1]["params"]["density"] == 0.7
    assert up1["params"] == {"lambda": 1.0, "normalize": True, "rescale": False}  # defaults filled in
    assert all(t["out_dtype"] == "F16" for t in plan["tensors"])
    assert plan["models"] == [str(ms[k]) for k in ("base", "m1", "m2")]
    assert up1["base"] == {"model": 0, "tensor": "model.layers.1.mlp.up_proj.weight"}
    # deterministic
    assert json.dumps(validate_merge(_cfg(ms, out_dtype="float16")).plan) == json.dumps(plan)
    # out dtype defaults to the base's
    assert {t["out_dtype"] for t in validate_merge(_cfg(ms)).plan["tensors"]} == {"BF16"}


def test_required_parameter_missing(related_models: Any) -> None:
    ms = related_models("llama", "bfloat16")
    with pytest.raises(ConfigError, match="'weight' is required"):
        validate_merge(MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": str(ms["base"]),
                                              "models": [{"model": str(ms["m1"])}]}))


def test_model_paths_mapping(related_models: Any) -> None:
    ms = related_models("llama", "bfloat16")
    d = {"merge_method": "task_arithmetic", "base_model": "base",
         "models": [{"model": "instruct", "parameters": {"weight": 1.0}}]}
    info = validate_merge(MergeConfig.from_dict(d), {"base": ms["base"], "instruct": ms["m1"]})
    assert info.model_paths == {"base": ms["base"], "instruct": ms["m1"]}
    with pytest.raises(ConfigError, match="did you mean 'instruct'"):
        validate_merge(MergeConfig.from_dict({**d, "models": [{"model": "instrct", "parameters": {"weight": 1}}]}),
                       {"base": ms["base"], "instruct": ms["m1"]})
    with pytest.raises(ConfigError, match="does not exist"):
        validate_merge(MergeConfig.from_dict({**d, "base_model": "/nonexistent/model"}))


def _variant(src: Path, dst: Path, edit: Any) -> Path:
    st = load_state_dict(src)
    edit(st)
    save_state_dict(st, dst)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_header_checks_before_any_data(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16")
    missing = _variant(ms["m1"], tmp_path / "missing", lambda st: st.pop("model.layers.1.mlp.up_proj.weight"))
    shape = _variant(ms["m1"], tmp_path / "shape", lambda st: st.__setitem__(
        "model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 32, dtype=torch.bfloat16)))
    vocab = _variant(ms["m1"], tmp_path / "vocab", lambda st: st.__setitem__(
        "model.embed_tokens.weight", torch.zeros(130, 64, dtype=torch.bfloat16)))
    cases = [(missing, "has no tensor 'model.layers.1.mlp.up_proj.weight'"),
             (shape, "shape [64, 32]"), (vocab, "vocabulary sizes differ")]
    for bad, words in cases:
        cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": str(ms["base"]),
                                     "models": [{"model": str(bad), "parameters": {"weight": 1}}]})
        with pytest.raises(MismatchError, match=words.replace("[", r"\[")):
            run_merge(cfg, tmp_path / "never")
        assert not (tmp_path / "never").exists()
        assert not [p for p in tmp_path.iterdir() if "finrecipe-tmp" in p.name]


def test_slices_renumber_layers(related_models: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ms = related_models("llama", "float32")
    d = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(ms["m1"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(ms["m2"]), "layer_range": [1, 3]}]}]}
    res = run_merge(MergeConfig.from_dict(d), tmp_path / "out")
    out = load_state_dict(res.out_dir)
    a, b = load_state_dict(ms["m1"]), load_state_dict(ms["m2"])
    for i, (src, j) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        k = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.equal(out[k], src[f"model.layers.{j}.mlp.up_proj.weight"]), k
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert "model.layers.4.mlp.up_proj.weight" not in out
    assert json.loads((res.out_dir / "config.json").read_text())["num_hidden_layers"] == 4
    AutoModelForCausalLM.from_pretrained(res.out_dir)
    # gradients restart per slice: t = local index / (slice length - 1)
    d2 = {"merge_method": "slerp", "base_model": str(ms["base"]), "parameters": {"t": [0.0, 1.0]},
          "slices": [{"sources": [{"model": str(ms["base"]), "layer_range": [0, 2]},
                                  {"model": str(ms["m1"]), "layer_range": [0, 2]}]},
                     {"sources": [{"model": str(ms["base"]), "layer_range": [1, 3]},
                                  {"model": str(ms["m1"]), "layer_range": [1, 3]}]}]}
    plan = validate_merge(MergeConfig.from_dict(d2)).plan
    ts = {t["name"]: t["params"]["t"] for t in plan["tensors"]}
    assert [ts[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == [0.0, 1.0, 0.0, 1.0]
    by = {t["name"]: t for t in plan["tensors"]}
    assert by["model.layers.2.mlp.up_proj.weight"]["sources"][0]["tensor"] == "model.layers.1.mlp.up_proj.weight"
    bad = {**d, "slices": [{"sources": [{"model": str(ms["m1"]), "layer_range": [0, 9]}]}]}
    with pytest.raises(ConfigError, match="beyond model"):
        validate_merge(MergeConfig.from_dict(bad))


def test_tokenizer_source_and_config_dtype(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16")
    donor = tmp_path / "donor"
    shutil.copytree(ms["m1"], donor)
    tc = json.loads((donor / "tokenizer_config.json").read_text())
    tc["model_max_length"] = 77
    (donor / "tokenizer_config.json").write_text(json.dumps(tc))
    d = {"merge_method": "task_arithmetic", "base_model": str(ms["base"]), "tokenizer_source": str(donor),
         "out_dtype": "float32", "models": [{"model": str(donor), "parameters": {"weight": 1.0}}]}
    res = run_merge(MergeConfig.from_dict(d), tmp_path / "out")
    assert json.loads((res.out_dir / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "float32"
    assert "task_arithmetic" in (res.out_dir / "mergekit_config.yml").read_text()
    with pytest.raises(ConfigError, match="tokenizer source"):
        validate_merge(MergeConfig.from_dict({**d, "tokenizer_source": "elsewhere"}))
    # union is supported (tests/test_merge_tokenizer.py): models sharing one tokenizer keep it
    assert validate_merge(MergeConfig.from_dict({**d, "tokenizer_source": "union"})).vocab is not None


def test_linear_zero_weight_sum_and_bad_numbers_refused(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16")
    d = {"merge_method": "linear", "models": [{"model": str(ms["m1"]), "parameters": {"weight": 1.0}},
                                              {"model": str(ms["m2"]), "parameters": {"weight": -1.0}}]}
    with pytest.raises(ConfigError, match="sum to 0 for tensor 'lm_head.weight'.*normalize"):
        run_merge(MergeConfig.from_dict(d), tmp_path / "never")
    assert list(tmp_path.iterdir()) == []
    # Only where the sum is zero: a filter rule that zeroes the sum for the mlp tensors names one.
    d["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": -1.0}, {"value": 1.0}]}
    with pytest.raises(ConfigError, match=r"tensor 'model\.layers\.0\.mlp\.\w+\.weight'"):
        validate_merge(MergeConfig.from_dict(d))
    # normalize: false is an explicit sum (zero weights give zeros, not infinities).
    validate_merge(MergeConfig.from_dict({**d, "parameters": {"normalize": False}}))
    for bad, words in (({"weight": float("inf")}, "finite"), ({"weight": float("nan")}, "finite"),
                       ({"weight": 1.0, "density": 1.5}, r"within \[0, 1\]")):
        with pytest.raises(ConfigError, match=words):
            MergeConfig.from_dict({"merge_method": "ties", "base_model": str(ms["base"]),
                                   "models": [{"model": str(ms["m1"]), "parameters": bad}]})
