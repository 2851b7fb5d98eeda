"""`dtype: bfloat16` computes in bf16 as mergekit does; `compute_dtype: float32` keeps exact f32.

The references are torch bf16 operations in mergekit's order (every elementwise step rounds to bf16,
sums over the models accumulate in f32 and round once); `make parity` checks the same against
mergekit's own output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_state_dict
from finrecipe.merge import MergeConfig, build_plan, run_merge


def _merge(tmp_path: Path, d: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    return load_state_dict(run_merge(MergeConfig.from_dict(d), tmp_path / name).out_dir)


def _cfg(method: str, ms: dict[str, Path], params: list[dict[str, Any]], top: dict[str, Any]) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(ms["base"]),
            "models": [{"model": str(ms[f"m{i + 1}"]), "parameters": p} for i, p in enumerate(params)], **top}


def _ta_bf16(base: torch.Tensor, xs: list[torch.Tensor], ws: list[float], lam: float) -> torch.Tensor:
    b = base.to(torch.bfloat16)
    deltas = torch.stack([x.to(torch.bfloat16) - b for x in xs])
    w = torch.tensor(ws, dtype=torch.bfloat16).reshape(-1, *([1] * base.dim()))
    mixed = (deltas * w).sum(dim=0)
    if lam != 1:
        mixed = mixed * lam
    return b + mixed


def _ties_bf16(base: torch.Tensor, xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    # density 1 (no pruning): sign election and the disjoint mean, normalize on
    b = base.to(torch.bfloat16)
    deltas = torch.stack([x.to(torch.bfloat16) - b for x in xs])
    w = torch.tensor(ws, dtype=torch.bfloat16).reshape(-1, *([1] * base.dim()))
    deltas = deltas * w
    majority = (deltas.sum(dim=0) >= 0).to(torch.bfloat16) * 2 - 1
    mask = deltas.sign() == majority
    mixed = (deltas * mask).sum(dim=0)
    div = (w * mask).sum(dim=0)
    div[div == 0] = 1
    return b + mixed / div


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_bf16_dtype_rounds_like_mergekit(related_models: Any, tmp_path: Path, method: str) -> None:
    ms = related_models("llama", "bfloat16", scale=0.003)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    ws = [0.7, 0.45]
    top: dict[str, Any] = {"dtype": "bfloat16"}
    if method == "task_arithmetic":
        top["parameters"] = {"lambda": 0.8}
    d = _cfg(method, ms, [{"weight": w} for w in ws], top)
    plan = build_plan(MergeConfig.from_dict(d)).plan
    assert all(t.get("compute_dtype") == "BF16" for t in plan["tensors"])
    out = _merge(tmp_path, d, "bf16")
    exact = _merge(tmp_path, {**d, "compute_dtype": "float32"}, "f32")
    differs = 0
    for k, b in S["base"].items():
        xs = [S["m1"][k], S["m2"][k]]
        ref = _ta_bf16(b, xs, ws, 0.8) if method == "task_arithmetic" else _ties_bf16(b, xs, ws)
        ulps = (out[k].view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1, k
        assert (ulps == 0).float().mean().item() > 0.999, k
        differs += int((exact[k] != out[k]).sum())
    assert differs > 0, "exact f32 compute must differ from bf16 compute somewhere"


def test_compute_dtype_float32_is_exact(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16", scale=0.003)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    d = _cfg("task_arithmetic", ms, [{"weight": 1.0}, {"weight": 1.0}],
             {"dtype": "bfloat16", "compute_dtype": "float32"})
    assert all("compute_dtype" not in t for t in build_plan(MergeConfig.from_dict(d)).plan["tensors"])
    out = _merge(tmp_path, d, "f32")
    for k, b in S["base"].items():
        bf = b.float()
        ref = (bf + ((S["m1"][k].float() - bf) + (S["m2"][k].float() - bf))).to(torch.bfloat16)
        assert torch.equal(out[k], ref), k


def test_compute_dtype_is_validated() -> None:
    from finrecipe.errors import RecipeError

    with pytest.raises(RecipeError, match="compute_dtype"):
        MergeConfig.from_dict({"merge_method": "linear", "compute_dtype": "int8",
                               "models": [{"model": "a", "parameters": {"weight": 1.0}}]})


def _model_stock_rows_bf16(w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """mergekit 0.1.5's model_stock with filter_wise in bf16 (torch's bf16 operations, its order)."""
    w0, ws = w0.to(torch.bfloat16), [w.to(torch.bfloat16) for w in ws]
    off = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(off):
        for b in off[i + 1:]:
            npr = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / npr.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * c) / (1 + (n - 1) * c)
    return t * (sum(ws) / n) + (1 - t) * w0


def test_model_stock_filter_wise_bf16_like_mergekit(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16", n=3, scale=0.003)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    d = _cfg("model_stock", ms, [{}, {}, {}], {"dtype": "bfloat16", "parameters": {"filter_wise": True}})
    out = _merge(tmp_path, d, "bf16")
    n2 = 0
    for k, b in S["base"].items():
        if b.dim() != 2:
            continue
        ref = _model_stock_rows_bf16(b, [S[f"m{i}"][k] for i in (1, 2, 3)])
        assert torch.equal(out[k], ref), k
        n2 += 1
    assert n2 > 3
    # compute_dtype: float32 keeps the exact factors (and differs somewhere)
    d["compute_dtype"] = "float32"
    exact = _merge(tmp_path, d, "f32")
    assert any(not torch.equal(exact[k], out[k]) for k in out)
