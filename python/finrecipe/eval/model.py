"""Loading a model directory for evaluation: bf16 on GPU, fp32 on CPU unless told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finrecipe.errors import BadInput


def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def pick_dtype(dtype: str | None, device: str) -> Any:
    import torch

    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise BadInput(f"dtype {dtype!r} is not supported; use one of auto, float32, bfloat16, float16")
    return table[dtype]


def load_model(path: str | Path, *, device: str | None = None, dtype: str | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) for a local Hugging Face model directory."""
    import transformers as tf

    p = Path(path)
    if not (p / "config.json").is_file():
        raise BadInput(f"{p}: not a model directory (no config.json); pass a Hugging Face model directory")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        model = tf.AutoModelForCausalLM.from_pretrained(str(p), dtype=dt,
                                                        trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"{p}: cannot load the model or tokenizer: {e}") from None
    model.to(dev)  # type: ignore[arg-type]
    model.eval()
    return model, tok
