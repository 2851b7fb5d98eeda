"""What a merge can combine: the dtype rule of the planner, FP8 block-scaled checkpoints, and the
detection of other quantized checkpoints.

Merge methods compute in float32 from BF16, F16 and F32 tensors, and from FP8 block-scaled ones
(the DeepSeek-V3 / Qwen3-FP8 layout: config.json `quantization_config: {quant_method: fp8,
weight_block_size: [128, 128]}`, each `F8_E4M3` weight `X` with a `X_scale_inv` tensor holding one
multiplier per block), which the core dequantises as it reads. Anything else is refused by name,
with the reason, before any data is read or written — except by `passthrough`, an explicit copy,
which copies any dtype as it is. Other quantized checkpoints (GPTQ, AWQ, bitsandbytes,
compressed-tensors, FP8 without block scales, GGUF files) are refused with what to do: merge the
unquantized checkpoint they came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finrecipe.errors import MismatchError

ARITH_DTYPES = ("BF16", "F16", "F32")
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "F64": 64, "I64": 64, "U64": 64}
_INTS = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64")


def nbytes(dtype: str, numel: int) -> int:
    return (numel * DTYPE_BITS.get(dtype, 8) + 7) // 8


def why_not_combinable(dtype: str) -> str | None:
    """Why tensors of `dtype` cannot be merged arithmetically (with what to do), or None."""
    if dtype in ARITH_DTYPES:
        return None
    if dtype in _INTS:
        return ("integer and boolean tensors (buffers, indices, packed quantized weights) cannot be "
                "averaged or interpolated; remove the tensor from the checkpoint or copy it from one "
                "model with a 'passthrough' merge")
    if dtype.startswith("F8_"):
        return ("8-bit floats are quantized weights whose values depend on separate scale tensors; "
                "merge the unquantized (bf16) checkpoint")
    if dtype in ("F4", "F6_E2M3", "F6_E3M2"):
        return ("sub-byte microscaling floats (MXFP4/MXFP6) are quantized weights; merge the "
                "unquantized (bf16) checkpoint")
    if dtype == "F64":
        return ("float64 would be computed in float32 and lose precision; convert the checkpoint to "
                "float32 first")
    return f"{dtype} is not a dtype finrecipe can compute with"


SCALE_SUFFIX = "_scale_inv"
FP8 = "F8_E4M3"


@dataclass(frozen=True)
class Fp8Layout:
    """An FP8 block-scaled checkpoint: the block size and its quantization_config."""

    block: tuple[int, int]
    config: dict[str, Any]


def _quant_config(p: Path) -> dict[str, Any] | None:
    cfg = p / "config.json"
    if not cfg.is_file():
        return None
    try:
        conf = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # config problems are reported where the config is used
    q = conf.get("quantization_config") if isinstance(conf, dict) else None
    return q if isinstance(q, dict) else None


def fp8_layout(model_dir: str | Path) -> Fp8Layout | None:
    """The FP8 block layout of a checkpoint the core can dequantise, or None."""
    p = Path(model_dir)
    q = _quant_config(p) if p.is_dir() else None
    if q is None or str(q.get("quant_method", "")).lower() != "fp8":
        return None
    b = q.get("weight_block_size")
    fmt = str(q.get("fmt", "e4m3")).lower()
    if (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                     and 0 < x <= 65536 for x in b) and fmt == "e4m3"):
        return Fp8Layout((b[0], b[1]), dict(q))
    return None


def scale_of(tensor: str) -> str:
    """The name of an FP8 weight's block-scale tensor."""
    return tensor + SCALE_SUFFIX


def is_scale_tensor(tensors: Any, name: str) -> bool:
    """Whether `name` is the block-scale companion of an FP8 weight in `tensors` (name -> info)."""
    if not name.endswith(SCALE_SUFFIX):
        return False
    w = tensors.get(name[: -len(SCALE_SUFFIX)])
    return w is not None and w.dtype == FP8


QUANT_HINTS = {
    "gptq": "GPTQ (packed int4/int8 weights with scales and zero points)",
    "awq": "AWQ (packed int4 weights with scales)",
    "bitsandbytes": "bitsandbytes (int8/nf4 weights with quantization state)",
    "compressed-tensors": "compressed-tensors (quantized or sparse packed weights)",
}


def quantization_problem(model_dir: str | Path) -> str | None:
    """Why the checkpoint at `model_dir` is a quantized one a merge cannot combine, or None."""
    p = Path(model_dir)
    if p.is_file() and p.suffix == ".gguf":
        return (f"{p} is a GGUF file (llama.cpp's quantized format), which cannot be merged; merge the "
                "original safetensors checkpoint it was converted from")
    if not p.is_dir():
        return None
    try:
        has_gguf = any(f.suffix == ".gguf" for f in p.iterdir())
    except OSError:
        has_gguf = False
    has_st = (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists()
    if has_gguf and not has_st:
        return (f"{p} holds GGUF files (llama.cpp's quantized format), which cannot be merged; merge the "
                "original safetensors checkpoint they were converted from")
    q = _quant_config(p)
    if q is None or fp8_layout(p) is not None:
        return None
    method = str(q.get("quant_method", "unknown"))
    if method.lower() == "fp8":
        return (f"{p} is an FP8 checkpoint without 2-D block scales (quantization_config needs fmt e4m3 "
                f"and weight_block_size [rows, cols], got {json.dumps(q)}); finrecipe merges block-scaled "
                "FP8 (DeepSeek-V3 / Qwen3-FP8 layout) only: merge the unquantized (bf16) checkpoint")
    what = QUANT_HINTS.get(method.lower(), f"quant_method {method!r}")
    return (f"{p} is a quantized checkpoint ({what}; config.json quantization_config.quant_method: "
            f"{method}); its weights cannot be merged arithmetically: merge the unquantized (bf16/fp16) "
            "checkpoint it was made from")


def check_not_quantized(name: str, model_dir: str | Path) -> None:
    problem = quantization_problem(model_dir)
    if problem is not None:
        raise MismatchError(f"model {name!r}: {problem}")
