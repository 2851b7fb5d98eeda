"""Merging a candidate straight into the weights of a model that is already loaded.

A merge search tries many merges of the same models. Writing each to disk and loading it again
costs a full write, a full read and a model construction per trial; here the base and the task
vectors δᵢ = modelᵢ − base are read once (float32, on the model's device) and each trial is one
fused pass per tensor, `param ← round(base + λ·Σ wᵢ·δᵢ)`, into the parameters of the loaded model.

- `task_arithmetic` and `ties` run in memory. Every parameter comes from the merge planner
  (`finrecipe.merge.build_plan`: gradients over layer index, filters, defaults, `normalize`,
  `lambda`), so a trial merges exactly what `finrecipe merge` writes with the same config
  (the same formulas as docs/merge-plan.md; float32 sums in another order: agreement to ~1e-6).
  TIES's top-k uses the core's order (|δ| descending, lower flat index first among equals); the
  rank of every element of δᵢ is computed once per tensor and kept, so a trial's trim is one compare.
- Other methods (`dare_ties`, `dare_linear`, `breadcrumbs*`) go through the Rust core into a
  temporary directory (DARE's masks come from the core's own counter-based generator), and the
  result is copied into the loaded model; the model is still not rebuilt.
- With `keep_in_memory=False` (task vectors larger than the memory budget), tensors are read per
  trial from the memory-mapped safetensors files instead of being kept.
- The merged values are rounded to the plan's output dtype first, then to the model's dtype, as
  a merge to disk followed by a load would round them.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

IN_MEMORY = ("task_arithmetic", "ties")
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _files(model_dir: Path) -> dict[str, Path]:
    """Tensor name → safetensors file of a model directory (single file or sharded)."""
    idx = model_dir / "model.safetensors.index.json"
    if idx.is_file():
        wmap = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
        return {k: model_dir / v for k, v in wmap.items()}
    from safetensors import safe_open

    f = model_dir / "model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        return dict.fromkeys(h.keys(), f)


class _Reader:
    """Lazy per-tensor reads from one model directory (memory-mapped)."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        self.where = _files(model_dir)
        self._handles: dict[Path, Any] = {}

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        f = self.where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), framework="pt")
        return h.get_tensor(name)

    def nbytes(self) -> int:
        total = 0
        for f in set(self.where.values()):
            total += f.stat().st_size
        return total


class InMemoryMerger:
    """Merges candidates of `models` (name → directory, all with the base's tensors) into `model`.

    `apply(merge_config)` returns how the trial was merged: "memory" or "core"."""

    def __init__(self, model: Any, models: Mapping[str, Path], base: str, *, keep_in_memory: bool = True,
                 threads: int = 0) -> None:
        import torch

        self.model = model
        self.paths = {n: Path(p).absolute() for n, p in models.items()}
        self.base = base
        self.threads = threads
        self.readers = {n: _Reader(p) for n, p in self.paths.items()}
        self.device = next(model.parameters()).device
        self.targets: dict[str, Any] = {}
        state = model.state_dict()
        for name in self.readers[base].where:
            if name not in state:
                from finrecipe.errors import MismatchError

                raise MismatchError(f"{self.paths[base]}: tensor {name!r} is not a parameter of the loaded "
                                    f"{type(model).__name__}")
            self.targets[name] = state[name]
        self.keep = keep_in_memory
        self._base: dict[str, Any] = {}
        self._delta: dict[tuple[str, str], Any] = {}
        self._rank: dict[tuple[str, str], Any] = {}
        self._torch = torch

    # -- the tensors ---------------------------------------------------------------------------
    def _base_t(self, tensor: str) -> Any:
        t = self._base.get(tensor)
        if t is None:
            t = self.readers[self.base].get(tensor).to(self.device, self._torch.float32)
            if self.keep:
                self._base[tensor] = t
        return t

    def _delta_t(self, model: str, tensor: str) -> Any:
        key = (model, tensor)
        d = self._delta.get(key)
        if d is None:
            d = self.readers[model].get(tensor).to(self.device, self._torch.float32) - self._base_t(tensor)
            if self.keep:
                self._delta[key] = d
        return d

    def _ranks(self, model: str, tensor: str, delta: Any) -> Any:
        """Rank of each element of δ by |δ| descending (ties: lower flat index first), int32."""
        key = (model, tensor)
        r = self._rank.get(key)
        if r is None:
            torch = self._torch
            order = torch.sort(delta.reshape(-1).abs(), descending=True, stable=True).indices
            r = torch.empty(order.numel(), dtype=torch.int32, device=delta.device)
            r[order] = torch.arange(order.numel(), dtype=torch.int32, device=delta.device)
            if self.keep:
                self._rank[key] = r
        return r

    # -- one trial -----------------------------------------------------------------------------
    def apply(self, merge_config: Mapping[str, Any], *, seed: int = 0) -> str:
        """Merge `merge_config` (a mergekit-style mapping naming models of `models`) into the model."""
        from finrecipe.merge import MergeConfig, build_plan

        cfg = MergeConfig.from_dict(dict(merge_config))
        if cfg.merge_method not in IN_MEMORY:
            self._apply_core(cfg, seed)
            return "core"
        info = build_plan(cfg, self.paths, seed=seed)
        by_path = {str(p): n for n, p in self.paths.items()}
        names = [by_path[str(Path(p).absolute())] for p in info.plan["models"]]
        torch = self._torch
        with torch.no_grad():
            for entry in info.plan["tensors"]:
                self._merge_tensor(entry, names)
        return "memory"

    def _merge_tensor(self, entry: Mapping[str, Any], names: list[str]) -> None:
        torch = self._torch
        name = entry["name"]
        target = self.targets.get(name)
        if target is None:
            return  # a tensor the loaded model does not have (checked at construction for the base)
        kernel = entry["kernel"]
        p = entry["params"]
        base = self._base_t(entry["base"]["tensor"])
        ws: list[float] = []
        mixed = None
        div = None
        if kernel == "task_arithmetic":
            for s in entry["sources"]:
                w = float(s["params"]["weight"])
                ws.append(w)
                d = self._delta_t(names[s["model"]], s["tensor"])
                if mixed is None:
                    mixed = torch.mul(d, w)
                else:
                    mixed.add_(d, alpha=w)
            assert mixed is not None
            if p["normalize"]:
                tw = sum(ws)
                mixed.div_(1.0 if abs(tw) < 1e-8 else tw)
        else:  # ties
            wds = []
            for s in entry["sources"]:
                w = float(s["params"]["weight"])
                ws.append(w)
                d = self._delta_t(names[s["model"]], s["tensor"])
                dens = float(s["params"]["density"])
                if dens < 1.0:
                    k = int(math.floor(dens * d.numel()))
                    keep = (self._ranks(names[s["model"]], s["tensor"], d) < k).reshape(d.shape)
                    wds.append(torch.where(keep, d * w, 0.0))
                else:
                    wds.append(d * w)
            total = wds[0].clone()
            for x in wds[1:]:
                total.add_(x)
            sign = torch.where(total >= 0, 1.0, -1.0)
            for w, wd in zip(ws, wds, strict=True):
                agree = wd.sign() == sign
                if mixed is None:
                    mixed = torch.where(agree, wd, 0.0)
                else:
                    mixed.add_(torch.where(agree, wd, 0.0))
                if p["normalize"]:
                    if div is None:
                        div = agree.to(torch.float32).mul_(w)
                    else:
                        div.add_(agree.to(torch.float32), alpha=w)
            assert mixed is not None
            if div is not None:
                div = torch.where(div.abs() < 1e-8, 1.0, div)
                mixed.div_(div)
        lam = float(p["lambda"])
        if lam != 1.0:
            mixed.mul_(lam)
        out = mixed.add_(base)
        out_dtype = getattr(torch, _DTYPES.get(entry["out_dtype"], "float32"))
        target.copy_(out.to(out_dtype).reshape(target.shape))

    def _apply_core(self, cfg: Any, seed: int) -> None:
        """Merge with the Rust core into a temporary directory, then copy into the model."""
        from safetensors import safe_open

        from finrecipe.merge import run_merge

        tmp = Path(tempfile.mkdtemp(prefix="finrecipe-trial-"))
        try:
            out = tmp / "model"
            run_merge(cfg, out, self.paths, seed=seed, threads=self.threads)
            torch = self._torch
            with torch.no_grad():
                for name, f in _files(out).items():
                    target = self.targets.get(name)
                    if target is None:
                        continue
                    with safe_open(str(f), framework="pt") as h:
                        target.copy_(h.get_tensor(name).to(target.device).reshape(target.shape))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, model_name: str) -> None:
        """Load one of the input models' weights into the model as they are (e.g. the instruct model)."""
        torch = self._torch
        r = self.readers[model_name]
        with torch.no_grad():
            for name in r.where:
                t = self.targets.get(name)
                if t is not None:
                    t.copy_(r.get(name).to(t.device).reshape(t.shape))

    def memory_bytes(self) -> int:
        """Bytes held for reuse (base, task vectors, TIES ranks)."""
        tot = 0
        for d in (self._base, self._delta, self._rank):
            for t in d.values():
                tot += t.numel() * t.element_size()
        return tot


def fp32_bytes(models: Mapping[str, Path], base: str) -> int:
    """Bytes that keeping the base and every task vector in float32 needs (estimated from headers)."""
    from finrecipe.merge import read_model

    info = read_model(models[base])
    return 4 * int(info.num_params) * len(models)


__all__ = ["IN_MEMORY", "InMemoryMerger", "fp32_bytes"]
