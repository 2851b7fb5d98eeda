"""Small bf16 trios (base, instruct, cpt) for the parity harness, built locally from transformers configs.

    python bench/parity/models.py OUT_DIR

Three architectures, each a few MB per model: `llama` (separate lm_head), `qwen2` (tied word
embeddings, attention biases) and `mixtral` (mixture of experts). The base has transformers' random
initialisation; instruct and cpt add independent N(0, 0.002) noise (then bf16 rounding, so many
task-vector magnitudes tie exactly, which exercises the top-k tie rules). A fourth model per family,
`far`, adds larger noise (N(0, 0.02)) so spherical methods see angles well away from zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenizer_cases  # noqa: E402

FAMILIES: dict[str, dict[str, object]] = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=False),
}
VARIANTS = {"base": 0.0, "instruct": 0.002, "cpt": 0.002, "far": 0.02}
VERSION = "5"  # bump when the models change; the harness rebuilds when the marker differs


def build(out: Path, family: str) -> None:
    spec = dict(FAMILIES[family])
    model_type = str(spec.pop("model_type"))
    cfg = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(sum(map(ord, family)))
    for variant, sigma in VARIANTS.items():
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + sigma * torch.randn(p.shape, generator=gen))
        model.to(torch.bfloat16).save_pretrained(out / family / variant)
        model.to(torch.float32)


def main() -> None:
    out = Path(sys.argv[1])
    marker = out / "VERSION"
    if marker.is_file() and marker.read_text() == VERSION:
        return
    for family in FAMILIES:
        build(out, family)
    tokenizer_cases.build(out)  # the tok-* families, whose tokenizers differ
    marker.write_text(VERSION)
    print(json.dumps({f: sorted(VARIANTS) for f in FAMILIES}))


if __name__ == "__main__":
    main()
