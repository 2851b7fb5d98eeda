"""FP8 block-scaled checkpoints (DeepSeek-V3 / Qwen3-FP8 layout): `float8_e4m3fn` weights with a
`weight_scale_inv` tensor per block, `quantization_config: {quant_method: fp8, weight_block_size}`.
The core dequantises them as it reads (weight × block scale), merges in float32 and writes bf16 by
default, or requantises per block with `out_dtype: float8_e4m3fn`. References are float32 torch
computations from the dequantised inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_state_dict, save_state_dict
from finrecipe.errors import ConfigError, MismatchError
from finrecipe.merge import MergeConfig, read_model, run_merge, validate_merge

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def expand(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block quantisation: scale = block amax / 448, q = fp8(w / scale)."""
    r, c = w.shape
    nr, nc = -(-r // block[0]), -(-c // block[1])
    s = torch.ones(nr, nc)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            amax = blk.abs().max().item()
            s[i, j] = amax / 448.0 if amax > 0 else 1.0
    q = (w.float() / expand(s, (r, c), block)).to(torch.float8_e4m3fn)
    return q, s


def dequantized(model: Path) -> dict[str, torch.Tensor]:
    """The float32 tensors a model stands for (FP8 weights times their block scales)."""
    st = load_state_dict(model)
    conf = json.loads((model / "config.json").read_text())
    q = conf.get("quantization_config")
    out = {}
    for k, v in st.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            block = tuple(q["weight_block_size"])
            out[k] = v.float() * expand(st[k + "_scale_inv"].float(), tuple(v.shape), block)
        else:
            out[k] = v.float()
    return out


def to_fp8(src: Path, dst: Path, block: tuple[int, int]) -> Path:
    """An FP8 block-scaled copy of a bf16 model (linear layers quantised, the rest kept)."""
    st = load_state_dict(src)
    out: dict[str, torch.Tensor] = {}
    for k, v in st.items():
        if v.ndim == 2 and any(p in k for p in LINEAR):
            q, s = quantize(v, block)
            out[k] = q
            out[k + "_scale_inv"] = s
        else:
            out[k] = v
    save_state_dict(out, dst, shard_bytes=40_000)
    for f in src.iterdir():
        if f.suffix == ".json" and not f.name.startswith("model.safetensors"):
            shutil.copy(f, dst / f.name)
    conf = json.loads((dst / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    return dst


@pytest.fixture(scope="module", params=[(128, 128), (24, 40)], ids=["block128", "block24x40"])
def fp8_trio(request: pytest.FixtureRequest, related_models: Any, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    block = request.param
    ms = related_models("llama", "bfloat16", scale=0.02)
    root = tmp_path_factory.mktemp(f"fp8-{block[0]}x{block[1]}")
    out = {f"{k}_fp8": to_fp8(v, root / k, block) for k, v in ms.items()}
    out.update(ms)
    return out


def cfg(base: Path, m1: Path, m2: Path, **top: Any) -> MergeConfig:
    return MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                                  "models": [{"model": str(m1), "parameters": {"weight": 1.0}},
                                             {"model": str(m2), "parameters": {"weight": 0.5}}], **top})


def reference(base: Path, m1: Path, m2: Path) -> dict[str, torch.Tensor]:
    b, x1, x2 = dequantized(base), dequantized(m1), dequantized(m2)
    return {k: v + 1.0 * (x1[k] - v) + 0.5 * (x2[k] - v) for k, v in b.items()}


def ordered(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns on a monotone integer line (ulp distance = difference; ±0 both 0)."""
    b = x.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(b >= 0x8000, -(b - 0x8000), b)


def assert_within_one_bf16_ulp(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Every element within one bf16 ulp of the float32 reference rounded to bf16, except where the
    result cancels to ~0 and the two float32 summation orders leave different tiny residues."""
    assert sorted(out) == sorted(ref)
    for k, r in ref.items():
        o = out[k]
        assert o.dtype == torch.bfloat16, k
        ulps = (ordered(o) - ordered(r.to(torch.bfloat16))).abs()
        cancels = (o.float() - r).abs() <= 1e-6 * r.abs().max()
        assert bool(((ulps <= 1) | cancels).all()), k


@pytest.mark.parametrize("combo", ["all_fp8", "mixed"])
def test_fp8_inputs_merge_to_bf16(fp8_trio: dict[str, Path], tmp_path: Path, combo: str) -> None:
    ms = fp8_trio
    base, m1, m2 = ((ms["base_fp8"], ms["m1_fp8"], ms["m2_fp8"]) if combo == "all_fp8"
                    else (ms["base"], ms["m1_fp8"], ms["m2"]))
    res = run_merge(cfg(base, m1, m2), tmp_path / "out")
    out = load_state_dict(res.out_dir)
    assert not any(k.endswith("_scale_inv") for k in out)
    assert_within_one_bf16_ulp(out, reference(base, m1, m2))
    conf = json.loads((res.out_dir / "config.json").read_text())
    assert "quantization_config" not in conf and conf["dtype"] == "bfloat16"
    assert "FP8 block-scaled inputs were dequantized" in (res.out_dir / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()


@pytest.mark.parametrize("combo", ["all_fp8", "mixed"])
def test_fp8_output_requantised_per_block(fp8_trio: dict[str, Path], tmp_path: Path, combo: str) -> None:
    ms = fp8_trio
    base, m1, m2 = ((ms["base_fp8"], ms["m1_fp8"], ms["m2_fp8"]) if combo == "all_fp8"
                    else (ms["base"], ms["m1_fp8"], ms["m2"]))
    res = run_merge(cfg(base, m1, m2, out_dtype="float8_e4m3fn"), tmp_path / "out")
    conf = json.loads((res.out_dir / "config.json").read_text())
    q = conf["quantization_config"]
    assert q["quant_method"] == "fp8"
    block = tuple(q["weight_block_size"])
    got = read_model(res.out_dir).tensors
    want = read_model(ms["m1_fp8"]).tensors  # the FP8 input's layout
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    ref = reference(base, m1, m2)
    out = dequantized(res.out_dir)
    raw = load_state_dict(res.out_dir)
    for k, r in ref.items():
        o = out[k]
        if raw[k].dtype != torch.float8_e4m3fn:
            assert raw[k].dtype == torch.bfloat16
            continue
        s = expand(raw[k + "_scale_inv"].float(), tuple(r.shape), block)
        # FP8 E4M3 rounding: half a step, 2^-4 relative for normals, 2^-10 (in units of the block
        # scale) for subnormals; plus the float32 rounding of the merge itself.
        bound = r.abs() / 16 + s / 1024 + 1e-6 * r.abs().max()
        assert bool(((o - r).abs() <= bound).all()), k
        # Each block's scale is its amax / 448, so the block's largest value is ±448 exactly.
        scales = raw[k + "_scale_inv"].float()
        amax = torch.zeros_like(scales)
        for i in range(scales.shape[0]):
            for j in range(scales.shape[1]):
                amax[i, j] = r[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max()
        torch.testing.assert_close(scales, amax / 448, rtol=1e-5, atol=0)


def test_fp8_analysis_reads_dequantised(fp8_trio: dict[str, Path]) -> None:
    from finrecipe.analysis import build_plan, run_plan

    ms = fp8_trio
    raw = run_plan(build_plan(ms["base_fp8"], [ms["m1_fp8"], ms["m2"]]))
    b, x1, x2 = (dequantized(ms[k]) for k in ("base_fp8", "m1_fp8", "m2"))
    assert set(raw["tensors"]) == set(b)
    for k, v in b.items():
        d = torch.stack([(x1[k] - v).flatten(), (x2[k] - v).flatten()]).double()
        torch.testing.assert_close(torch.tensor(raw["tensors"][k]["gram"], dtype=torch.float64), d @ d.T,
                                   rtol=1e-5, atol=1e-9)


def test_fp8_checkpoint_errors(fp8_trio: dict[str, Path], tmp_path: Path) -> None:
    ms = fp8_trio
    broken = tmp_path / "broken"
    shutil.copytree(ms["m1_fp8"], broken)
    st = load_state_dict(broken)
    del st["model.layers.1.mlp.up_proj.weight_scale_inv"]
    for f in broken.glob("model*.safetensors*"):
        f.unlink()
    save_state_dict(st, broken)
    with pytest.raises(MismatchError, match="F8_E4M3 tensor 'model.layers.1.mlp.up_proj.weight' has no "
                                            "'model.layers.1.mlp.up_proj.weight_scale_inv'"):
        validate_merge(cfg(ms["base"], broken, ms["m2"]))
    # FP8 output needs an FP8 input to take the block layout from.
    with pytest.raises(ConfigError, match="no input model is an FP8 block-scaled"):
        validate_merge(cfg(ms["base"], ms["m1"], ms["m2"], out_dtype="float8_e4m3fn"))
    # Passthrough dequantises too (bf16 by default).
    res = run_merge(MergeConfig.from_dict({"merge_method": "passthrough", "models": [{"model": str(ms["m1_fp8"])}]}),
                    tmp_path / "pt")
    out = load_state_dict(res.out_dir)
    assert_within_one_bf16_ulp(out, dequantized(ms["m1_fp8"]))
