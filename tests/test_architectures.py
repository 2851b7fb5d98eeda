"""The architectures vendors ship, each through the whole recipe at a tiny size: a fresh model, two
continual-pretraining steps, a task-arithmetic merge with an instruct twin, a scoring pass — and the
merged weights checked against a float32 reference computed here (base + Δinstruct + Δdomain)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import load_state_dict
from finrecipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "assets" / "tiny-tokenizer"

COMMON: dict[str, Any] = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 64},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16},
    "phi3": {},
    "gpt_neox": {"num_key_value_heads": None},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "output_router_logits": True},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                  "output_router_logits": True},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1,
                    "topk_group": 1, "num_key_value_heads": 2},  # MLA: as many key/value heads as heads
}

WORDS = "the market rose fell bank rate bond stock yen profit loss risk".split()


def _config(arch: str) -> dict[str, Any]:
    d = {"model_type": arch, **COMMON, **ARCHS[arch]}
    return {k: v for k, v in d.items() if v is not None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("arch-data")
    rows = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + i % 5)) for i in range(40)]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    shutil.copytree(TOKENIZER, d / "tokenizer")
    return d / "corpus.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_end_to_end(arch: str, corpus: Path, tmp_path: Path) -> None:
    cfg = _config(arch)
    recipe = {
        "finrecipe": 1, "name": f"arch-{arch}",
        "models": {"base": {"init": {"config": cfg, "seed": 0, "tokenizer": str(corpus.parent / "tokenizer")}},
                   "instruct": {"init": {"config": cfg, "seed": 1, "tokenizer": "base"}}},
        "datasets": {"corpus": {"files": str(corpus)}},
        "stages": {
            "cpt": {"type": "continual_pretraining", "model": "base", "datasets": ["corpus"], "seq_len": 16,
                    "micro_batch_size": 2, "grad_accum": 1, "max_tokens": 64, "optimizer": {"lr": 1e-2},
                    "schedule": {"kind": "constant"}},
            "merged": {"type": "merge", "merge_method": "task_arithmetic", "base_model": "base",
                       "models": [{"model": "instruct", "parameters": {"weight": 1.0}},
                                  {"model": "cpt", "parameters": {"weight": 1.0}}],
                       "dtype": "float32"},
            "eval": {"type": "evaluate", "models": ["merged"], "tasks": [{"perplexity": "corpus"}]},
        },
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    res = load_recipe(p).apply()
    nodes = {n.name: n for n in res.nodes}
    assert res.ran == ["base", "instruct", "cpt", "merged", "eval"]

    # two optimizer steps with finite losses
    steps = [json.loads(line) for line in (nodes["cpt"].out_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and '"step"' in line]
    train = [s for s in steps if s.get("split", "train") == "train"]
    assert len(train) == 2 and all(math.isfinite(s["loss"]) for s in train), steps

    # the merge is base + (instruct - base) + (cpt - base), tensor by tensor
    sd = {n: load_state_dict(nodes[n].model_dir) for n in ("base", "instruct", "cpt", "merged")}
    assert set(sd["merged"]) == set(sd["base"])
    for k, b in sd["base"].items():
        want = b.float() + (sd["instruct"][k].float() - b.float()) + (sd["cpt"][k].float() - b.float())
        assert torch.allclose(sd["merged"][k].float(), want, atol=1e-6, rtol=1e-5), k

    # it loads where the inputs loaded; tied embeddings stay tied
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(nodes["merged"].model_dir)
    if cfg.get("tie_word_embeddings"):
        assert m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
        assert not any(k.startswith("lm_head") for k in sd["merged"])

    # and it was scored
    scores = nodes["eval"].metrics["models"]["merged"]["tasks"]["ppl:corpus"]
    assert math.isfinite(scores["value"]) and scores["value"] > 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_router_loss_is_part_of_the_training_loss(arch: str) -> None:
    """With output_router_logits, transformers' loss is mean cross-entropy + router_aux_loss_coef ×
    the load-balancing loss; the trainer's summed loss is that times the number of targets."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from finrecipe.train.trainer import Trainer

    d = _config(arch)
    mt = d.pop("model_type")
    cfg = AutoConfig.for_model(mt, **d, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    x = torch.randint(3, 100, (2, 12))
    y = torch.randint(3, 100, (2, 12))
    y[0, :3] = -100  # masked targets count for neither term
    stub = SimpleNamespace(model=m, _autocast=lambda _d: nullcontext())
    got = Trainer._loss_sum(stub, SimpleNamespace(device=torch.device("cpu")), x, y)  # type: ignore[arg-type]
    out = m(input_ids=x)
    n = int((y != -100).sum())
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    assert torch.allclose(got / n, ce + 0.5 * out.aux_loss, rtol=1e-5, atol=1e-6)
    cfg.output_router_logits = False  # without it, no router term (transformers adds none either)
    got_plain = Trainer._loss_sum(stub, SimpleNamespace(device=torch.device("cpu")), x, y)  # type: ignore[arg-type]
    assert torch.allclose(got_plain / n, ce, rtol=1e-5, atol=1e-6)
