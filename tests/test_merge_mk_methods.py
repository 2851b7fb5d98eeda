"""mergekit 0.1.5's newer methods (nearswap, ram, ramplus_tl, karcher) against torch references
written from their definitions; `make parity` compares them with mergekit's own output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_state_dict
from finrecipe.errors import RecipeError
from finrecipe.merge import MergeConfig, run_merge


def _merge(tmp_path: Path, d: dict[str, Any], name: str = "out") -> dict[str, torch.Tensor]:
    return load_state_dict(run_merge(MergeConfig.from_dict(d), tmp_path / name).out_dir)


def _cfg(method: str, ms: dict[str, Path], names: list[str], params: dict[str, Any] | None = None,
         base: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"merge_method": method, "models": [{"model": str(ms[n])} for n in names]}
    if base:
        d["base_model"] = str(ms["base"])
    if params:
        d["parameters"] = params
    return d


def test_nearswap(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32")
    S = {k: load_state_dict(v) for k, v in ms.items()}
    out = _merge(tmp_path, _cfg("nearswap", ms, ["m1"], {"t": 0.004}))
    for k, a in S["base"].items():
        b = S["m1"][k]
        w = ((1.0 / (a - b).abs().clamp(min=1e-6)) * 0.004).clamp(0, 1)
        torch.testing.assert_close(out[k], w * b + (1 - w) * a, rtol=1e-6, atol=1e-7, msg=k)
    with pytest.raises(RecipeError, match="'t'"):  # t is required
        _merge(tmp_path, _cfg("nearswap", ms, ["m1"]), "no-t")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram(related_models: Any, tmp_path: Path, method: str) -> None:
    ms = related_models("llama", "float32", n=3)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    eps, r, alpha = 0.01, 0.3, 0.5
    params: dict[str, Any] = {"epsilon": eps} | ({"r": r, "alpha": alpha} if method == "ramplus_tl" else {})
    out = _merge(tmp_path, _cfg(method, ms, ["m1", "m2", "m3"], params))
    for k, b in S["base"].items():
        tv = torch.stack([S[f"m{i}"][k] - b for i in (1, 2, 3)])
        nz = tv.abs() > eps
        c = nz.sum(0)
        unique, overlap = c == 1, c > 1
        lam = torch.ones(3)
        if method == "ramplus_tl":
            shared = (nz & overlap).reshape(3, -1).sum(1).float()
            uniq = (nz & unique).reshape(3, -1).sum(1).float().clamp(min=eps)
            lam = 1 + r * (shared / uniq).clamp(0, alpha)
        lam = lam.reshape(-1, *([1] * b.dim()))
        tvz = tv * nz
        ref = b + (tvz * unique * lam + tvz * overlap / c.clamp(min=1)).sum(0)
        torch.testing.assert_close(out[k], ref, rtol=1e-6, atol=1e-7, msg=k)
        assert bool(unique.any()) and bool(overlap.any()), "the fixture should have both kinds"


def test_karcher(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=3, scale=0.05)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    out = _merge(tmp_path, _cfg("karcher", ms, ["m1", "m2", "m3"], base=False))
    for k in S["base"]:
        xs = [S[f"m{i}"][k].double() for i in (1, 2, 3)]
        norms = [x.norm() for x in xs]
        units = [x / n for x, n in zip(xs, norms, strict=True)]
        mean = sum(units) / 3
        mean = mean / mean.norm()
        for _ in range(10):
            tangent = torch.zeros_like(mean)
            for u in units:
                d = torch.clamp((mean * u).sum(), -1, 1)
                th = torch.arccos(d)
                if th < 1e-5:
                    continue
                tangent = tangent + (th / torch.sin(th)) * (u - d * mean) / 3
            tn = tangent.norm()
            if tn < 1e-5:
                break
            mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
            mean = mean / mean.norm()
        ref = (sum(norms) / 3 * mean).float()
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6, msg=k)


def test_della_keeps_by_magnitude_rank_and_rescales(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=1)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    d = _cfg("della_linear", ms, ["m1"])
    d["models"][0]["parameters"] = {"weight": 1.0, "density": 0.5, "epsilon": 0.3}
    out = _merge(tmp_path, d)
    again = _merge(tmp_path, d, "again")
    w = "model.layers.1.mlp.down_proj.weight"
    delta = S["m1"][w] - S["base"][w]
    got = out[w] - S["base"][w]
    kept = got != 0
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    low, high = kept[ranks < 0.5].float().mean().item(), kept[ranks >= 0.5].float().mean().item()
    assert abs(low - 0.35) < 0.04 and abs(high - 0.65) < 0.04, (low, high)  # p = 0.2 + 0.6·rank
    assert abs(got.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-3  # L1 rescale
    assert all(torch.equal(out[k], again[k]) for k in out)
    with pytest.raises(RecipeError, match="epsilon"):
        d["models"][0]["parameters"]["epsilon"] = 0.6
        _merge(tmp_path, d, "bad")


def test_sce_weights_by_mean_square_and_elects_signs(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=3)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    out = _merge(tmp_path, _cfg("sce", ms, ["m1", "m2", "m3"]))
    for k, b in S["base"].items():
        tv = torch.stack([S[f"m{i}"][k] - b for i in (1, 2, 3)])
        w = tv.square().reshape(3, -1).mean(dim=1)
        w = w / w.sum()
        w = w.reshape(-1, *([1] * b.dim()))
        mask = tv.sign() == (tv.sum(0) >= 0).float() * 2 - 1
        ref = b + (tv * w * mask).sum(0) / (w * mask).sum(0).clamp(min=1e-6)
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-7, msg=k)
    with pytest.raises(RecipeError, match="select_topk"):
        _merge(tmp_path, _cfg("sce", ms, ["m1", "m2"], {"select_topk": 0.5}), "topk")
