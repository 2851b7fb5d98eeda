"""Never silently wrong: a tensor a merge method cannot combine (every dtype of the safetensors
format but BF16, F16 and F32) is refused by name with the reason before anything is written;
`passthrough`, an explicit copy, copies every dtype byte for byte; quantized checkpoints are
refused by name."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from finrecipe.cli import main
from finrecipe.errors import MismatchError
from finrecipe.merge import MergeConfig, read_model, run_merge, validate_merge

# Every dtype the safetensors format defines, with its bits per element.
ALL_DTYPES = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "F64": 64, "I64": 64, "U64": 64}
REASONS = {"BOOL": "integer and boolean", "U8": "integer", "I8": "integer", "I16": "integer",
           "U16": "integer", "I32": "integer", "U32": "integer", "I64": "integer", "U64": "integer",
           "F8_E5M2": "8-bit floats", "F8_E4M3": "8-bit floats", "F8_E8M0": "8-bit floats",
           "F4": "sub-byte", "F6_E2M3": "sub-byte", "F6_E3M2": "sub-byte", "F64": "float64"}


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written byte by byte (any dtype, including the sub-byte ones)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def tensor_bytes(model: Path, name: str) -> bytes:
    info = read_model(model)
    t = info.tensors[name]
    raw = (info.path / t.file).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n + t.data_offsets[0]: 8 + n + t.data_offsets[1]]


def trio(root: Path, dtype: str) -> dict[str, Path]:
    """Three models with a float tensor `w` and a tensor `x` of `dtype` (8 elements)."""
    out = {}
    for i, name in enumerate(("base", "m1", "m2")):
        w = struct.pack("<16f", *[0.25 * (k + i) for k in range(16)])
        nb = 8 * ALL_DTYPES[dtype] // 8
        x = bytes((17 * k + 31 * i + 1) % 251 for k in range(nb))
        if dtype in ("F32", "F16", "BF16", "F64"):  # finite values for the float dtypes
            fmt = {"F32": "<8f", "F64": "<8d"}.get(dtype)
            x = struct.pack(fmt, *[0.5 * k - i for k in range(8)]) if fmt else bytes(
                b for k in range(8) for b in (0x00, 0x3C if dtype == "F16" else 0x3F))
        write_raw(root / name / "model.safetensors", {"w": ("F32", [4, 4], w), "x": (dtype, [8], x)})
        out[name] = root / name
    return out


def ta(ms: dict[str, Path], method: str = "task_arithmetic", **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(ms["base"]),
            "models": [{"model": str(ms["m1"]), "parameters": {"weight": 1.0, **params}},
                       {"model": str(ms["m2"]), "parameters": {"weight": 0.5, **params}}]}


@pytest.mark.parametrize("dtype", sorted(ALL_DTYPES))
def test_every_dtype_merged_or_refused_by_name(tmp_path: Path, dtype: str) -> None:
    ms = trio(tmp_path / "in", dtype)
    assert read_model(ms["m1"]).tensors["x"].dtype == dtype
    out = tmp_path / "out"
    for cfg in (ta(ms), ta(ms, "ties", density=0.5), {"merge_method": "linear", "models": ta(ms)["models"]}):
        if dtype in ("BF16", "F16", "F32"):
            res = run_merge(MergeConfig.from_dict(cfg), out, overwrite=True)
            assert read_model(res.out_dir).tensors["x"].dtype == dtype
            continue
        with pytest.raises(MismatchError) as ei:
            run_merge(MergeConfig.from_dict(cfg), out)
        msg = str(ei.value)
        assert "tensor 'x'" in msg and f"is {dtype}" in msg and REASONS[dtype] in msg, msg
        assert cfg["merge_method"] in msg and "\n" not in msg
        assert not out.exists() and not [p for p in tmp_path.iterdir() if "finrecipe-tmp" in p.name]


@pytest.mark.parametrize("dtype", sorted(ALL_DTYPES))
def test_passthrough_copies_every_dtype_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    ms = trio(tmp_path / "in", dtype)
    res = run_merge(MergeConfig.from_dict({"merge_method": "passthrough", "models": [{"model": str(ms["m1"])}]}),
                    tmp_path / "copy")
    assert read_model(res.out_dir).tensors["x"].dtype == dtype
    assert tensor_bytes(res.out_dir, "x") == tensor_bytes(ms["m1"], "x")
    # out_dtype converts what arithmetic applies to, and copies the rest as it is.
    res = run_merge(MergeConfig.from_dict({"merge_method": "passthrough", "out_dtype": "bfloat16",
                                           "models": [{"model": str(ms["m1"])}]}), tmp_path / "bf16")
    got = read_model(res.out_dir).tensors
    assert got["w"].dtype == "BF16"
    if dtype in ("BF16", "F16", "F32"):
        assert got["x"].dtype == "BF16"
    else:
        assert got["x"].dtype == dtype and tensor_bytes(res.out_dir, "x") == tensor_bytes(ms["m1"], "x")
        # Scaling is arithmetic: refused for such a tensor, by name.
        with pytest.raises(MismatchError, match=f"tensor 'x' of model .* is {dtype}: 'passthrough' can copy it "
                                                "only as it is, not scaled by 2"):
            validate_merge(MergeConfig.from_dict({"merge_method": "passthrough", "models": [
                {"model": str(ms["m1"]), "parameters": {"scale": 2.0}}]}))


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors", "fp8"])
def test_quantized_checkpoints_refused_by_name(tmp_path: Path, method: str) -> None:
    ms = trio(tmp_path / "in", "BF16")
    conf = {"model_type": "llama", "quantization_config": {"quant_method": method, "bits": 4}}
    (ms["m2"] / "config.json").write_text(json.dumps(conf))
    words = (f"is a quantized checkpoint .*quant_method: {method}\\)" if method != "fp8"
             else "is an FP8 checkpoint without 2-D block scales")  # block-scaled FP8 is merged
    with pytest.raises(MismatchError, match=f"model '.*m2': .* {words}.*merge the unquantized"):
        validate_merge(MergeConfig.from_dict(ta(ms)))
    cfg = tmp_path / "m.yml"
    cfg.write_text(json.dumps(ta(ms)))
    r = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert r.exit_code == 2 and "checkpoint" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_gguf_refused_by_name(tmp_path: Path) -> None:
    ms = trio(tmp_path / "in", "BF16")
    g = tmp_path / "gguf"
    g.mkdir()
    (g / "model-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(60))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ms["base"]),
           "models": [{"model": str(g), "parameters": {"weight": 1.0}}]}
    with pytest.raises(MismatchError, match="GGUF files .* merge the original safetensors checkpoint"):
        validate_merge(MergeConfig.from_dict(cfg))
    cfg["models"][0]["model"] = str(g / "model-q4_k_m.gguf")
    with pytest.raises(MismatchError, match="is a GGUF file"):
        validate_merge(MergeConfig.from_dict(cfg))
