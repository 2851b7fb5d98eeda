"""Tests of the raw Rust API (`finrecipe._core`): read_model, merge plans, analyze, progress and
cancellation. References are plain torch float32 computations written here."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from finrecipe import _core
from finrecipe.errors import ConfigError, FormatError, MismatchError

SHAPES = {"emb": (37, 16), "w": (24, 40), "norm": (16,), "odd": (3, 5, 7)}


def _models(root: Path, dtype: torch.dtype = torch.bfloat16, n: int = 2, seed: int = 0) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    dirs = []
    for i in range(n + 1):
        d = root / ("base" if i == 0 else f"m{i}")
        d.mkdir(parents=True, exist_ok=True)
        st = {}
        for k, v in base.items():
            t = v if i == 0 else v + 0.05 * torch.randn(v.shape, generator=g)
            if k == "w" and i > 0:
                # Repeated magnitudes so that ties at the top-k threshold really occur.
                t = v + 0.0625 * torch.randint(-3, 4, v.shape, generator=g).float()
            st[k] = t.to(dtype)
        save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def _load(d: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}


def _plan(dirs: list[Path], out: Path, method: str, src_params: list[dict[str, Any]],
          params: dict[str, Any], *, base: bool = True, out_dtype: str = "F32",
          threads: int = 2, chunk: int = 64, seed: int = 0, shard: int = 1 << 30,
          names: list[str] | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    tensors = []
    for name in names or list(SHAPES):
        t: dict[str, Any] = {
            "name": name, "kernel": method, "out_dtype": out_dtype,
            "sources": [{"model": i + 1, "tensor": name, "params": p} for i, p in enumerate(src_params)],
            "params": params,
        }
        if base:
            t["base"] = {"model": 0, "tensor": name}
        tensors.append(t)
    return json.dumps({"version": 2, "models": [str(d) for d in dirs], "out_dir": str(out),
                       "out_shard_size": shard, "threads": threads, "seed": seed, "chunk_elems": chunk,
                       "metadata": {"format": "pt"}, "tensors": tensors})


def _gta_ref(base: torch.Tensor, xs: list[torch.Tensor], ws: list[float], keep: list[torch.Tensor] | None,
             consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    deltas = [x - base for x in xs]
    if keep is not None:
        deltas = [d * k for d, k in zip(deltas, keep, strict=False)]
    wd = torch.stack([d * w for d, w in zip(deltas, ws, strict=False)])
    wt = torch.tensor(ws).view(-1, *([1] * base.dim()))
    if consensus:
        maj = (wd.sum(0) >= 0).float() * 2 - 1
        mask = (wd.sign() == maj).float()
        mixed = (wd * mask).sum(0)
        div = (wt * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = wt.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def _topk_mask(d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keep ranks [lo, hi) of |d| (descending, ties by lower index first)."""
    order = torch.sort(d.abs().flatten(), descending=True, stable=True).indices
    m = torch.zeros(d.numel())
    m[order[lo:hi]] = 1
    return m.view(d.shape)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _models(tmp_path_factory.mktemp("trio"))


def _run(plan: str, out: Path) -> dict[str, torch.Tensor]:
    res = _core.merge(plan, None)
    assert res["tensors"] == len(json.loads(plan)["tensors"])
    return _load(out)


# --- read_model -----------------------------------------------------------------------------


def test_read_model_single_and_sharded(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    info = _core.read_model(str(tmp_path))
    assert info["files"] == ["model.safetensors"]
    assert info["tensors"]["a"]["shape"] == [2, 3]
    assert info["tensors"]["a"]["dtype"] == "F32"
    assert info["tensors"]["b"]["dtype"] == "BF16"
    assert info["metadata"] == {"format": "pt"}

    sh = tmp_path / "sharded"
    sh.mkdir()
    save_file({"a": torch.ones(2)}, str(sh / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(3)}, str(sh / "model-00002-of-00002.safetensors"))
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sh / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    info = _core.read_model(str(sh))
    assert info["tensors"]["b"]["file"] == "model-00002-of-00002.safetensors"
    # The index lists a tensor its shard lacks.
    wm["c"] = "model-00002-of-00002.safetensors"
    (sh / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(FormatError, match="'c'"):
        _core.read_model(str(sh))


def test_read_model_rejects_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(10, dtype=torch.float32)}, str(good))
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-3],
        "trailing": raw + b"\0",
        "tiny": raw[:5],
        "huge_header": struct.pack("<Q", 1 << 40) + raw[8:],
        "bad_json": struct.pack("<Q", 5) + b"{abc}",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(FormatError, match=name + ".safetensors"):
            _core.read_model(str(p))
    with pytest.raises(FormatError, match="no model.safetensors"):
        _core.read_model(str(tmp_path))


# --- merge methods vs torch float32 ---------------------------------------------------------


def test_task_arithmetic_and_linear(trio: list[Path], tmp_path: Path) -> None:
    b, m1, m2 = (_load(d) for d in trio)
    sp = [{"weight": 1.0}, {"weight": 0.7}]
    out = _run(_plan(trio, tmp_path / "ta", "task_arithmetic", sp, {"lambda": 1.0, "normalize": False}),
               tmp_path / "ta")
    for k in SHAPES:
        ref = _gta_ref(b[k], [m1[k], m2[k]], [1.0, 0.7], None, False, False, 1.0)
        assert torch.equal(out[k], ref), k
    out = _run(_plan(trio, tmp_path / "ta2", "task_arithmetic", sp, {"lambda": 0.5, "normalize": True},
                     out_dtype="BF16"), tmp_path / "ta2")
    for k in SHAPES:
        ref = _gta_ref(b[k], [m1[k], m2[k]], [1.0, 0.7], None, False, True, 0.5)
        assert torch.equal(out[k], ref.to(torch.bfloat16).float()), k
    out = _run(_plan(trio, tmp_path / "lin", "linear", [{"weight": 0.3}, {"weight": 0.5}],
                     {"normalize": True}, base=False), tmp_path / "lin")
    for k in SHAPES:
        ref = (0.3 * m1[k] + 0.5 * m2[k]) / torch.tensor(0.8)
        assert torch.equal(out[k], ref), k


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_magnitude_methods_exact(trio: list[Path], tmp_path: Path, method: str) -> None:
    b, m1, m2 = (_load(d) for d in trio)
    sp: list[dict[str, Any]] = [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7}]
    if method.startswith("breadcrumbs"):
        sp[0]["gamma"], sp[1]["gamma"] = 0.05, 0.1
    out = _run(_plan(trio, tmp_path / "o", method, sp, {"lambda": 1.0, "normalize": True, "rescale": False}, chunk=50),
               tmp_path / "o")
    for k in SHAPES:
        keep = []
        for x, p in zip([m1[k], m2[k]], sp, strict=False):
            n = x.numel()
            target = int(p["density"] * n)
            top = int(p.get("gamma", 0.0) * n)
            if n - target - top < 0:
                top = n - target
            keep.append(_topk_mask(x - b[k], top, top + target))
        ref = _gta_ref(b[k], [m1[k], m2[k]], [1.0, 0.6], keep, method != "breadcrumbs", True, 1.0)
        assert torch.equal(out[k], ref), k
        assert all(int(m.sum()) == int(p["density"] * m.numel()) for m, p in zip(keep, sp, strict=False))


def test_dare_is_reproducible_and_rescaled(trio: list[Path], tmp_path: Path) -> None:
    b, m1, m2 = (_load(d) for d in trio)
    sp = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    outs = []
    for i, (threads, chunk) in enumerate([(1, 1 << 20), (2, 7), (2, 100)]):
        o = tmp_path / f"d{i}"
        outs.append(_run(_plan(trio, o, "dare_linear", sp, {"lambda": 1.0, "normalize": False, "rescale": True},
                               threads=threads, chunk=chunk, seed=5), o))
    for k in SHAPES:
        assert torch.equal(outs[0][k], outs[1][k]) and torch.equal(outs[0][k], outs[2][k])
    o = tmp_path / "seed"
    other = _run(_plan(trio, o, "dare_linear", sp, {"lambda": 1.0, "normalize": False, "rescale": True},
                       seed=6), o)
    assert not torch.equal(other["w"], outs[0]["w"])
    # Without rescale, each element is base + a subset of the deltas.
    o = tmp_path / "nr"
    nr = _run(_plan(trio, o, "dare_linear", sp, {"lambda": 1.0, "normalize": False, "rescale": False},
                    seed=5), o)
    k = "w"
    d1, d2 = m1[k] - b[k], m2[k] - b[k]
    cands = torch.stack([b[k], b[k] + d1, b[k] + d2, b[k] + d1 + d2])
    assert bool(((cands - nr[k]).abs().min(0).values < 1e-6).all())
    # With rescale: the kept δ's L1 norm equals the original's, per source (checked on one source).
    o = tmp_path / "one"
    one = _run(_plan(trio[:2], o, "dare_linear", sp[:1], {"lambda": 1.0, "normalize": False, "rescale": True},
                     seed=5), o)
    for k in SHAPES:
        kept = one[k] - b[k]
        assert math.isclose(float(kept.abs().sum()), float(d1.abs().sum()) if k == "w" else
                            float((m1[k] - b[k]).abs().sum()), rel_tol=1e-4)


def test_slerp_model_stock_passthrough(trio: list[Path], tmp_path: Path) -> None:
    b, m1, m2 = (_load(d) for d in trio)
    o = tmp_path / "s"
    out = _run(_plan(trio[:2], o, "slerp", [{}], {"t": 0.3}), o)
    for k in SHAPES:
        v0, v1 = b[k].double(), m1[k].double()
        dot = float((v0 / v0.norm() * v1 / v1.norm()).sum())
        if abs(dot) > 0.9995:
            ref = 0.7 * v0 + 0.3 * v1
        else:
            th = math.acos(dot)
            ref = math.sin(0.7 * th) / math.sin(th) * v0 + math.sin(0.3 * th) / math.sin(th) * v1
        torch.testing.assert_close(out[k].double(), ref, rtol=1e-5, atol=1e-5)
    o = tmp_path / "s0"
    out = _run(_plan(trio[:2], o, "slerp", [{}], {"t": 0.0}), o)
    assert all(torch.equal(out[k], b[k]) for k in SHAPES)

    for fw in (False, True):
        o = tmp_path / f"ms{fw}"
        out = _run(_plan(trio, o, "model_stock", [{}, {}], {"filter_wise": fw}, chunk=33), o)
        for k in SHAPES:
            d1, d2 = m1[k] - b[k], m2[k] - b[k]
            if fw and d1.dim() >= 2:
                cos = ((d1 * d2).sum(-1) / (d1.norm(dim=-1) * d2.norm(dim=-1)).clamp(min=1e-6)).unsqueeze(-1)
            else:
                cos = (d1 * d2).sum() / (d1.norm() * d2.norm())
            t = 2 * cos / (1 + cos)
            ref = t * (m1[k] + m2[k]) / 2 + (1 - t) * b[k]
            torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-5)

    o = tmp_path / "p"
    out = _run(_plan(trio[:2], o, "passthrough", [{"scale": 2.0}], {}, base=False), o)
    assert all(torch.equal(out[k], 2 * m1[k]) for k in SHAPES)
    o = tmp_path / "pc"
    _core.merge(_plan(trio[:2], o, "passthrough", [{"scale": 1.0}], {}, base=False, out_dtype="BF16"), None)
    raw = load_file(str(o / "model.safetensors"))
    src = load_file(str(trio[1] / "model.safetensors"))
    assert all(torch.equal(raw[k], src[k]) for k in SHAPES)


def test_sharded_output_loads(trio: list[Path], tmp_path: Path) -> None:
    o = tmp_path / "sh"
    res = _core.merge(_plan(trio, o, "task_arithmetic", [{"weight": 1.0}, {"weight": 1.0}],
                            {"lambda": 1.0, "normalize": False}, shard=2000, out_dtype="BF16"), None)
    assert "model.safetensors.index.json" in res["files"]
    assert len(res["files"]) > 2
    idx = json.loads((o / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == sum(math.prod(s) * 2 for s in SHAPES.values())
    got: dict[str, torch.Tensor] = {}
    for f in set(idx["weight_map"].values()):
        got.update(load_file(str(o / f)))
    assert set(got) == set(SHAPES)
    assert _core.read_model(str(o))["tensors"]["w"]["dtype"] == "BF16"


def test_plan_errors(trio: list[Path], tmp_path: Path) -> None:
    good = json.loads(_plan(trio, tmp_path / "e", "ties", [{"weight": 1.0, "density": 0.5}] * 2,
                            {"lambda": 1.0, "normalize": True, "rescale": False}))
    bad = dict(good, extra=1)
    with pytest.raises(ConfigError, match="extra"):
        _core.merge(json.dumps(bad), None)
    bad = json.loads(json.dumps(good))
    bad["tensors"][0]["kernel"] = "tiez"
    with pytest.raises(ConfigError, match="unknown kernel 'tiez'"):
        _core.merge(json.dumps(bad), None)
    bad = json.loads(json.dumps(good))
    del bad["tensors"][1]["sources"][0]["params"]["density"]
    with pytest.raises(ConfigError, match="'density' is missing"):
        _core.merge(json.dumps(bad), None)
    bad = json.loads(json.dumps(good))
    bad["tensors"][1]["sources"][0]["tensor"] = "emb"
    with pytest.raises(MismatchError, match="shape"):
        _core.merge(json.dumps(bad), None)
    bad = json.loads(json.dumps(good))
    bad["tensors"][1]["sources"][0]["tensor"] = "nope"
    with pytest.raises(MismatchError, match="no tensor 'nope'"):
        _core.merge(json.dumps(bad), None)
    bad = json.loads(json.dumps(good))
    bad["version"] = 1
    with pytest.raises(ConfigError, match="version 1 is not supported"):
        _core.merge(json.dumps(bad), None)
    lin = json.loads(_plan(trio, tmp_path / "e", "linear", [{"weight": 0.5}, {"weight": -0.5}],
                           {"normalize": True}, base=False))
    with pytest.raises(ConfigError, match="sum to 0"):
        _core.merge(json.dumps(lin), None)
    assert list((tmp_path / "e").iterdir()) == []


# --- the kernel table ---------------------------------------------------------------------------


def test_kernels_agree_with_the_method_table() -> None:
    from finrecipe.merge.methods import METHODS, MethodDef, ParamDef, kernel_mismatches
    from finrecipe.merge.plan import PLAN_VERSION

    ks = _core.kernels()
    assert kernel_mismatches(ks) == []
    assert _core.PLAN_VERSION == PLAN_VERSION
    assert {k["name"] for k in ks} == {m.kernel for m in METHODS.values()}
    ties = next(k for k in ks if k["name"] == "ties")
    assert [p["name"] for p in ties["source_params"]] == ["weight", "density"]
    assert ties["base"] == "required" and ties["max_sources"] is None
    # Disagreements are found in both directions, with the method and the parameter named.
    bad = dict(METHODS)
    ta = METHODS["task_arithmetic"]
    bad["task_arithmetic"] = MethodDef(ta.name, ta.kernel, (*ta.params, ParamDef("epsilon", "global", 0.1)),
                                       needs_base=True)
    bad["nosuch"] = MethodDef("nosuch", "nosuch", (), needs_base=False)
    del bad["model_stock"]
    problems = " | ".join(kernel_mismatches(ks, bad))
    assert "method 'task_arithmetic': global parameters" in problems and "epsilon" in problems
    assert "kernel 'nosuch' is not in the compiled core" in problems
    assert "kernel 'model_stock' of the compiled core is used by no merge method" in problems
    wide = dict(METHODS)
    ties_m = METHODS["ties"]
    wide["ties"] = MethodDef("ties", "ties", tuple(ParamDef("density", "model", 1.0, lo=0.0, hi=2.0)
                                                    if p.name == "density" else p for p in ties_m.params),
                             needs_base=True)
    assert any("'density' range [0, 2]" in p for p in kernel_mismatches(ks, wide))


# --- progress and cancellation ----------------------------------------------------------------


def _big(root: Path) -> list[Path]:
    dirs = []
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        d = root / f"big{i}"
        d.mkdir()
        save_file({f"t{j}": torch.randn(1 << 20, generator=g).to(torch.bfloat16) for j in range(4)},
                  str(d / "model.safetensors"))
        dirs.append(d)
    return dirs


def test_progress_and_keyboard_interrupt(tmp_path: Path) -> None:
    dirs = _big(tmp_path)
    names = [f"t{j}" for j in range(4)]
    calls: list[tuple[int, int]] = []
    o = tmp_path / "ok"
    _core.merge(_plan(dirs, o, "ties", [{"weight": 1.0, "density": 0.3}] * 2,
                      {"lambda": 1.0, "normalize": True, "rescale": False}, names=names, chunk=4096, threads=1),
                lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] == 4 * (1 << 20) * 4
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:], strict=False))

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    o = tmp_path / "cancel"
    with pytest.raises(KeyboardInterrupt):
        _core.merge(_plan(dirs, o, "ties", [{"weight": 1.0, "density": 0.3}] * 2,
                          {"lambda": 1.0, "normalize": True, "rescale": False}, names=names * 1, chunk=4096, threads=1),
                    interrupt)
    assert list(o.iterdir()) == []


def test_interrupt_reported_after_last_chunk_still_cancels(trio: list[Path], tmp_path: Path) -> None:
    """Ctrl-C that arrives with the final progress report (the work already finished) leaves no files."""
    reports: list[tuple[int, int]] = []

    def interrupt_at_end(done: int, total: int) -> None:
        reports.append((done, total))
        if done == total:
            raise KeyboardInterrupt

    o = tmp_path / "late"
    with pytest.raises(KeyboardInterrupt):
        _core.merge(_plan(trio, o, "task_arithmetic", [{"weight": 1.0}] * 2, {"lambda": 1.0, "normalize": False}),
                    interrupt_at_end)
    assert reports and reports[-1][0] == reports[-1][1]
    assert list(o.iterdir()) == []


# --- analyze ------------------------------------------------------------------------------------


def test_analyze_gram(trio: list[Path]) -> None:
    b, m1, m2 = (_load(d) for d in trio)
    plan = {"models": [str(d) for d in trio], "threads": 2, "chunk_elems": 100,
            "tensors": [{"name": k, "base": {"model": 0, "tensor": k},
                         "vectors": [{"model": 1, "tensor": k}, {"model": 2, "tensor": k}]} for k in SHAPES]}
    res = _core.analyze(json.dumps(plan), None)
    tot = torch.zeros(2, 2, dtype=torch.float64)
    for k in SHAPES:
        d = torch.stack([(m1[k] - b[k]).flatten(), (m2[k] - b[k]).flatten()]).double()
        g = d @ d.T
        tot += g
        torch.testing.assert_close(torch.tensor(res["tensors"][k]["gram"], dtype=torch.float64), g)
        assert res["tensors"][k]["numel"] == math.prod(SHAPES[k])
    torch.testing.assert_close(torch.tensor(res["total"]["gram"], dtype=torch.float64), tot)


def test_rounding_bit_identical_to_torch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0,
                             1e-40, -1e-45, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    ties = (torch.randint(-2**15, 2**15, (2000,), generator=g, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    x = torch.cat([specials, torch.randn(5000, generator=g) * 10.0 ** torch.randint(-8, 5, (5000,), generator=g),
                   ties[~ties.isnan()]])
    src = tmp_path / "src"
    src.mkdir()
    save_file({"x": x}, str(src / "model.safetensors"))
    for dt, tdt in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        o = tmp_path / dt
        o.mkdir()
        plan = {"version": 2, "models": [str(src)], "out_dir": str(o), "out_shard_size": 1 << 30, "threads": 2,
                "seed": 0, "chunk_elems": 1000, "metadata": {},
                "tensors": [{"name": "x", "kernel": "passthrough", "out_dtype": dt,
                             "sources": [{"model": 0, "tensor": "x", "params": {"scale": 1.0}}], "params": {}}]}
        _core.merge(json.dumps(plan), None)
        got = load_file(str(o / "model.safetensors"))["x"]
        want = x.to(tdt)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), dt
