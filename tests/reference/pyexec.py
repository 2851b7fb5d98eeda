"""A plain-torch executor of merge plans (docs/merge-plan.md): the tests' second opinion.

The Rust core (`finrecipe._core.merge`) is the real executor: streaming, parallel, bounded memory.
This module runs the same plan tensor by tensor with torch in float32, holding one output shard in
memory at a time, reading headers with the pure-Python reader of `reference.headers`. DARE masks
here come from torch generators seeded per (seed, tensor name), so they differ from the core's.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError, FormatError, IoError
from finrecipe.merge.headers import INDEX
from reference.headers import DTYPE_SIZES, py_read_model

_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                 "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _tdtype(name: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


class _Reader:
    def __init__(self, models: list[str]) -> None:
        self.infos = [py_read_model(m) for m in models]
        self._open: dict[tuple[int, str], Any] = {}

    def get(self, model: int, tensor: str) -> Any:
        from safetensors import safe_open

        info = self.infos[model]
        t = info.tensors.get(tensor)
        if t is None:
            raise FormatError(f"{info.path}: no tensor {tensor!r}")
        key = (model, t.file)
        if key not in self._open:
            try:
                self._open[key] = safe_open(str(info.path / t.file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise FormatError(f"{info.path / t.file}: {e}") from None
        try:
            return self._open[key].get_tensor(tensor)
        except Exception as e:
            raise FormatError(f"{info.path / t.file}: tensor {tensor!r}: {e}") from None


def _gen(seed: int, name: str) -> Any:
    import torch

    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator().manual_seed(h)


def _ranked(d: Any) -> Any:
    """Flat indices by |d| descending, lower index first among equal magnitudes (the core's order)."""
    import torch

    return torch.sort(d.reshape(-1).abs(), descending=True, stable=True).indices


def _magnitude(d: Any, density: float) -> Any:
    import torch

    if density >= 1.0:
        return d
    out = torch.zeros_like(d)
    k = int(math.floor(density * d.numel()))
    if k <= 0:
        return out
    idx = _ranked(d)[:k]
    out.view(-1)[idx] = d.reshape(-1)[idx]
    return out


def _breadcrumbs(d: Any, density: float, gamma: float) -> Any:
    import torch

    n = d.numel()
    keep = int(math.floor(density * n))
    top = min(int(math.floor(gamma * n)), n - keep)  # past the end: drop fewer outliers
    idx = _ranked(d)[top:top + keep]
    out = torch.zeros_like(d)
    out.view(-1)[idx] = d.reshape(-1)[idx]
    return out


def _dare(d: Any, density: float, rescale: bool, gen: Any) -> Any:
    import torch

    if density >= 1.0:
        return d
    mask = torch.rand(d.shape, generator=gen) < density
    res = d * mask
    if rescale:
        n0, n1 = d.abs().sum(), res.abs().sum()
        if float(n1) > 0:
            res = res * (n0 / n1)
    return res


def merge_tensor(entry: dict[str, Any], get: Callable[[dict[str, Any]], Any], seed: int) -> Any:
    """The merged tensor (float32, or the input dtype for a byte copy) for one plan entry."""
    import torch

    method = entry["kernel"]
    p = entry["params"]
    srcs = entry["sources"]
    if method == "passthrough":
        x = get(srcs[0])
        scale = float(srcs[0]["params"]["scale"])
        if scale != 1.0:
            return x.float() * scale
        return x
    base = get(entry["base"]).float() if entry.get("base") else None
    xs = [get(s).float() for s in srcs]
    ws = [float(s["params"].get("weight", 1.0)) for s in srcs]
    if method == "linear":
        # one fused multiply-add per model, as mergekit's torch addcmul_
        acc = torch.zeros_like(xs[0])
        for w, x in zip(ws, xs, strict=True):
            acc.addcmul_(x, torch.tensor(w, dtype=torch.float32))
        if p["normalize"]:
            tw = sum(ws)
            if abs(tw) < 1e-8:
                raise ConfigError(f"plan: the weights of tensor {entry['name']!r} sum to zero")
            acc = acc / tw
        return acc
    assert base is not None
    if method == "slerp":
        t = float(p["t"])
        v0, v1 = base, xs[0]
        n0 = v0 / max(float(v0.norm()), 1e-8)
        n1 = v1 / max(float(v1.norm()), 1e-8)
        dot = float((n0 * n1).sum())
        if abs(dot) > 0.9995:
            return (1 - t) * v0 + t * v1
        th = math.acos(max(-1.0, min(1.0, dot)))
        s = math.sin(th)
        return (math.sin((1 - t) * th) / s) * v0 + (math.sin(t * th) / s) * v1
    if method == "model_stock":
        ds = [x - base for x in xs]
        n = len(ds)
        if p["filter_wise"] and base.ndim >= 2:
            flat = [d.reshape(d.shape[0], -1) for d in ds]
        else:
            flat = [d.reshape(1, -1) for d in ds]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                a, b = flat[i], flat[j]
                c = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
                cos.append(c)
        c = torch.stack(cos).mean(0)
        tt = n * c / (1 + (n - 1) * c)
        shape = [-1] + [1] * (base.ndim - 1) if (p["filter_wise"] and base.ndim >= 2) else [1] * base.ndim
        tt = tt.reshape(shape) if base.ndim else tt.reshape(())
        mean = sum(xs) / n
        return tt * mean + (1 - tt) * base
    # generalized task arithmetic
    deltas = []
    for i, (s, x) in enumerate(zip(srcs, xs, strict=True)):
        d = x - base
        sp = s["params"]
        if method == "ties":
            d = _magnitude(d, float(sp["density"]))
        elif method in ("dare_linear", "dare_ties"):
            d = _dare(d, float(sp["density"]), bool(p["rescale"]), _gen(seed, f"{entry['name']}#{i}"))
        elif method in ("breadcrumbs", "breadcrumbs_ties"):
            d = _breadcrumbs(d, float(sp["density"]), float(sp["gamma"]))
        elif method != "task_arithmetic":
            raise ConfigError(f"plan: unknown method {method!r} for tensor {entry['name']!r}")
        deltas.append(d)
    wd = torch.stack([w * d for w, d in zip(ws, deltas, strict=True)])
    wt = torch.tensor(ws, dtype=torch.float32).view([-1] + [1] * base.ndim)
    if method in ("ties", "dare_ties", "breadcrumbs_ties"):
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = wd.sign() == sign
    else:
        mask = torch.ones_like(wd, dtype=torch.bool)
    mixed = (wd * mask).sum(0)
    if p["normalize"]:
        div = (wt * mask).sum(0)
        div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
        mixed = mixed / div
    return base + float(p["lambda"]) * mixed


def merge(plan_json: str, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run a plan like `finrecipe._core.merge` does (same outputs and return value), with torch."""
    import torch
    from safetensors.torch import save_file

    t0 = time.monotonic()
    plan = json.loads(plan_json)
    out = Path(plan["out_dir"])
    if not out.is_dir():
        raise IoError(f"{out}: output directory does not exist")
    reader = _Reader(plan["models"])
    seed = int(plan.get("seed", 0))
    budget = int(plan["out_shard_size"])

    def get(ref: dict[str, Any]) -> Any:
        return reader.get(int(ref["model"]), ref["tensor"])

    sizes = []
    for e in plan["tensors"]:
        src = e["base"] or e["sources"][0]
        info = reader.infos[int(src["model"])].tensors[src["tensor"]]
        sizes.append(info.numel * DTYPE_SIZES[e["out_dtype"]])
    total = sum(sizes)
    groups: list[list[int]] = [[]]
    acc = 0
    for i, sz in enumerate(sizes):
        if groups[-1] and acc + sz > budget:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += sz
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                  for i in range(n)]
    done = 0
    wmap: dict[str, str] = {}
    for fname, g in zip(names, groups, strict=True):
        shard: dict[str, Any] = {}
        for i in g:
            e = plan["tensors"][i]
            with torch.no_grad():
                r = merge_tensor(e, get, seed)
            shard[e["name"]] = r.to(_tdtype(e["out_dtype"])).contiguous()
            wmap[e["name"]] = fname
            done += sizes[i]
            if progress is not None:
                progress(done, total)
        save_file(shard, str(out / fname), metadata=plan.get("metadata") or {"format": "pt"})
    if n > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap},
                                            indent=2))
    files = names + ([INDEX] if n > 1 else [])
    return {"files": files, "total_bytes": total, "tensors": len(plan["tensors"]),
            "seconds": time.monotonic() - t0}
