"""mergekit 0.1.5's newer methods (nearswap, ram, ramplus_tl, karcher, sce, nuslerp, multislerp,
arcee_fusion) against torch references
written from their definitions; `make parity` compares them with mergekit's own output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import load_state_dict
from finrecipe.errors import RecipeError
from finrecipe.merge import MergeConfig, build_plan, run_merge


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


def _karcher_bf16(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean as torch computes it with bf16 tensors (every op in bf16, norms of the f32
    upcast, 0-dim f32 scalars as torch promotes them), in the order of mergekit 0.1.5's statements."""
    xs = [x.to(torch.bfloat16) for x in xs]
    norms = [torch.linalg.vector_norm(x.float()) for x in xs]
    units = [(x / n).to(torch.bfloat16) for x, n in zip(xs, norms, strict=True)]
    a = 1.0 / len(xs)
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += a * u
    mean = (mean / torch.linalg.vector_norm(mean.float())).to(torch.bfloat16)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            d = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            th = torch.arccos(d)
            if th.item() < tol:
                continue
            tangent += a * (th / torch.sin(th)) * (u - d * mean)
        tn = torch.linalg.vector_norm(tangent.float())
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(torch.bfloat16)
        un = torch.linalg.vector_norm(mean.float())
        if un.item() > tol:
            mean = (mean / un).to(torch.bfloat16)
    return sum(a * n for n in norms) * mean


def test_karcher_bf16_follows_torchs_bf16_iteration(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16", n=3, scale=0.05)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    d = _cfg("karcher", ms, ["m1", "m2", "m3"], base=False) | {"dtype": "bfloat16"}
    assert all(t.get("compute_dtype") == "BF16" for t in build_plan(MergeConfig.from_dict(d)).plan["tensors"])
    out = _merge(tmp_path, d, "bf16")
    exact = _merge(tmp_path, d | {"compute_dtype": "float32"}, "f32")
    differs = 0
    for k in S["base"]:
        ref = _karcher_bf16([S[f"m{i}"][k] for i in (1, 2, 3)])
        assert torch.equal(out[k], ref), k
        differs += int((exact[k] != out[k]).sum())
    assert differs > 0, "the exact float32 iteration must differ from the bf16 one somewhere"


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
        _merge(tmp_path, _cfg("sce", ms, ["m1", "m2"], {"select_topk": 1.5}), "topk")


def test_sce_select_topk_keeps_the_most_varied_elements(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=3)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    out = _merge(tmp_path, _cfg("sce", ms, ["m1", "m2", "m3"], {"select_topk": 0.3}))
    for k, b in S["base"].items():
        tv = torch.stack([S[f"m{i}"][k] - b for i in (1, 2, 3)])
        var = tv.var(dim=0, unbiased=False)
        kk = int(torch.count_nonzero(var) * 0.3)
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        keep[torch.sort(var.reshape(-1), descending=True, stable=True).indices[:kk]] = True
        tv = tv * keep.reshape(var.shape).float()
        w = tv.square().reshape(3, -1).mean(dim=1)
        w = (w / w.sum()).reshape(-1, *([1] * b.dim()))
        mask = tv.sign() == (tv.sum(0) >= 0).float() * 2 - 1
        ref = b + (tv * w * mask).sum(0) / (w * mask).sum(0).clamp(min=1e-6)
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-7, msg=k)
        assert torch.equal(out[k][~keep.reshape(var.shape)], b[~keep.reshape(var.shape)])


def _nuslerp_ref(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    a, c = v0.double(), v1.double()
    if flatten:
        a, c = a.reshape(-1), c.reshape(-1)
    elif dim != -1:
        a, c = a.transpose(dim, -1), c.transpose(dim, -1)
    na = a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    nc = c.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((a / na) * (c / nc)).sum(-1, keepdim=True).clamp(-1, 1)
    th = torch.acos(cos)
    r = (torch.sin((1 - t) * th) * a + torch.sin(t * th) * c) / torch.sin(th)
    r = torch.where(1 - cos.square() <= 1e-16, (1 - t) * a + t * c, r)
    if dim != -1 and not flatten:
        r = r.transpose(dim, -1)
    return r.reshape(v0.shape).float()


@pytest.mark.parametrize(("flatten", "row_wise", "base"), [(True, False, True), (False, False, False),
                                                           (False, True, True)])
def test_nuslerp(related_models: Any, tmp_path: Path, flatten: bool, row_wise: bool, base: bool) -> None:
    ms = related_models("llama", "float32", n=2)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    d = _cfg("nuslerp", ms, ["m1", "m2"], {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, base=base)
    d["models"][0]["parameters"] = {"weight": 0.3}
    d["models"][1]["parameters"] = {"weight": 0.9}
    out = _merge(tmp_path, d)
    for k, b in S["base"].items():
        v0, v1 = S["m1"][k], S["m2"][k]
        if base:
            ref = b + _nuslerp_ref(0.75, v0 - b, v1 - b, 0 if row_wise else -1, flatten)
        else:
            ref = _nuslerp_ref(0.75, v0, v1, 0 if row_wise else -1, flatten)
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6, msg=k)


def test_multislerp(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=3)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    d = _cfg("multislerp", ms, ["m1", "m2", "m3"])
    for m, w in zip(d["models"], (0.2, 0.5, 0.3), strict=True):
        m["parameters"] = {"weight": w}
    out = _merge(tmp_path, d)
    eps = 1e-8
    for k, b in S["base"].items():
        tv = torch.stack([S[f"m{i}"][k].double() - b.double() for i in (1, 2, 3)]).reshape(3, -1)
        w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
        norms = tv.norm(dim=-1, keepdim=True)
        u = tv / (norms + eps)
        mean = (u * w.view(-1, 1)).sum(0)
        mean = mean / mean.norm()
        tang = u - (u * mean).sum(-1, keepdim=True) * mean
        tr = (tang * w.view(-1, 1)).sum(0)
        tn = tr.norm() + eps
        res = (mean * torch.cos(tn) + tr * torch.sin(tn) / tn) * (norms.squeeze(-1) * w).sum()
        torch.testing.assert_close(out[k], (b.double() + res.view(b.shape)).float(), rtol=1e-5, atol=1e-6, msg=k)
    # a zero weight sum with normalize_weights is refused before anything is read
    for m, w in zip(d["models"], (0.5, -0.5, 0.0), strict=True):
        m["parameters"] = {"weight": w}
    with pytest.raises(RecipeError, match="normalize_weights"):
        _merge(tmp_path, d, "zero")


def test_arcee_fusion(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=1)
    S = {k: load_state_dict(v) for k, v in ms.items()}
    out = _merge(tmp_path, _cfg("arcee_fusion", ms, ["m1"]))
    for k, b in S["base"].items():
        p = S["m1"][k]
        pp = torch.softmax(p.double(), dim=-1) + 1e-8
        qq = torch.softmax(b.double(), dim=-1) + 1e-8
        imp = ((p - b).abs().double() * (pp * torch.log(pp / qq)).sum(-1, keepdim=True)).reshape(-1)
        s = torch.sort(imp).values
        q1, med, q3 = s[(torch.tensor([0.25, 0.5, 0.75]) * (s.numel() - 1)).long()]
        thr = med + 1.5 * (q3 - q1)
        took = out[k].reshape(-1) != b.reshape(-1)
        clear = (imp - thr).abs() > 1e-3 * thr  # away from the threshold, float noise cannot flip
        assert torch.equal(took[clear], (imp >= thr)[clear] & (p != b).reshape(-1)[clear]), k
        assert torch.equal(out[k].reshape(-1)[took], (b + (p - b)).reshape(-1)[took])


def test_new_methods_refuse_bad_inputs(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "float32", n=3)
    with pytest.raises(RecipeError, match="exactly 2"):
        _merge(tmp_path, _cfg("nuslerp", ms, ["m1", "m2", "m3"], {"weight": 1.0}), "a")
    with pytest.raises(RecipeError, match="'weight'"):  # weight is required
        _merge(tmp_path, _cfg("nuslerp", ms, ["m1", "m2"]), "b")
    with pytest.raises(RecipeError, match="base_model"):
        _merge(tmp_path, _cfg("arcee_fusion", ms, ["m1"], base=False), "c")
    with pytest.raises(RecipeError, match="exactly 1"):
        _merge(tmp_path, _cfg("arcee_fusion", ms, ["m1", "m2"]), "d")
    with pytest.raises(RecipeError, match="nuslerp_flatten"):
        _merge(tmp_path, _cfg("nuslerp", ms, ["m1", "m2"], {"weight": 1.0, "nuslerp_flatten": 3}), "e")
