"""Merging a candidate straight into the weights of a model that is already loaded.

A merge search tries many merges of the same models. Writing each to disk and loading it again
costs a full write, a full read and a model construction per trial; here the base and the task
vectors δᵢ = modelᵢ − base are read once (float32, on the model's device) and each trial writes
`round(base + λ·merge(wᵢ, δᵢ))` into the parameters of the loaded model.

- `task_arithmetic` and `ties` run in memory. Every parameter comes from the merge planner
  (`finrecipe.merge.build_plan`: gradients over layer index, filters, defaults, `normalize`,
  `lambda`), so a trial merges exactly what `finrecipe merge` writes with the same config.
- On the CPU (float32 parameters) a trial is one call per tensor of the Rust core's in-place
  kernel (`_core.merge_into`, rust/src/inplace.rs): the streaming merge's operations in its
  order, multithreaded, written into the parameter's memory — bit-identical to `finrecipe merge`.
  TIES's top-k (|δ| descending, lower flat index first among equals) reads the magnitude keys of
  each δᵢ sorted once (`_core.sort_magnitudes`, a radix sort, kept with the task vectors), so a
  trial's threshold is a lookup, not a selection pass.
- On a GPU, the same formulas as torch passes (float32 sums in the same order; ranks of |δ| from
  one stable sort per tensor, kept).
- Anything else goes through the Rust core into a temporary directory and is copied into the
  loaded model (still no model rebuild): other methods (`dare_ties`, `dare_linear`,
  `breadcrumbs*`; DARE's masks come from the core's own counter-based generator), bfloat16
  compute (`dtype: bfloat16`), `rescale`, sliced or renamed tensors, or any plan entry this
  module does not know.
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


class Prefetch:
    """Reads the base and the task vectors of `models` (float32, CPU) and, with `sort`, the sorted
    magnitude keys TIES needs, in a background thread (the core's `load_task_vectors`, GIL
    released) while the caller loads the model and scores the instruct model. An
    `InMemoryMerger` given it takes the tensors over at its first use; if reading failed, the
    merger reads lazily as without it (and meets the same error where it matters)."""

    def __init__(self, paths: Mapping[str, Path], base: str, models: list[str], *, sort: bool,
                 threads: int = 1) -> None:
        import threading

        import numpy as np
        import torch

        from finrecipe import _core

        self.base_t: dict[str, Any] = {}
        self.delta: dict[tuple[str, str], Any] = {}
        self.keys: dict[tuple[str, str], Any] = {}
        self.error: BaseException | None = None
        info = {n: _core.read_model(str(paths[n]))["tensors"] for n in [base, *models]}
        names = [t for t, d in info[base].items() if d["dtype"] in _DTYPES
                 and all(t in info[m] and info[m][t]["dtype"] in _DTYPES and info[m][t]["shape"] == d["shape"]
                         for m in models)]
        shape = {t: tuple(info[base][t]["shape"]) for t in names}
        self.base_t = {t: torch.empty(shape[t], dtype=torch.float32) for t in names}
        self.delta = {(m, t): torch.empty(shape[t], dtype=torch.float32) for m in models for t in names}
        if sort:
            self.keys = {(m, t): np.empty(math.prod(shape[t]), dtype=np.uint32) for m in models for t in names}

        def work() -> None:
            try:
                _core.load_task_vectors(
                    str(paths[base]), [str(paths[m]) for m in models], names,
                    [self.base_t[t].numpy() for t in names],
                    [[self.delta[(m, t)].numpy() for t in names] for m in models],
                    [[self.keys[(m, t)] for t in names] for m in models] if sort else None,
                    threads=threads)
            except BaseException as e:  # noqa: BLE001 - handed to the merger, which reads lazily instead
                self.error = e

        self._thread = threading.Thread(target=work, name="finrecipe-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> bool:
        """Waits for the reads; whether they succeeded."""
        self._thread.join()
        return self.error is None


class InMemoryMerger:
    """Merges candidates of `models` (name → directory, all with the base's tensors) into `model`.

    `apply(merge_config)` returns how the trial was merged: "memory" or "core"."""

    def __init__(self, model: Any, models: Mapping[str, Path], base: str, *, keep_in_memory: bool = True,
                 threads: int = 0, prefetch: Prefetch | None = None) -> None:
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
        self._rank: dict[tuple[str, str], Any] = {}  # GPU path: rank of each element by |δ|
        self._keys: dict[tuple[str, str], Any] = {}  # CPU path: sorted magnitude keys (uint32)
        self._torch = torch
        self._prefetch = prefetch if keep_in_memory and self.device.type == "cpu" else None

    def _adopt(self) -> None:
        """Takes over what a `Prefetch` read (once, at the first use of a tensor)."""
        pre, self._prefetch = self._prefetch, None
        if pre is not None and pre.wait():
            self._base.update(pre.base_t)
            self._delta.update(pre.delta)
            self._keys.update(pre.keys)

    # -- the tensors ---------------------------------------------------------------------------
    def _base_t(self, tensor: str) -> Any:
        if self._prefetch is not None:
            self._adopt()
        t = self._base.get(tensor)
        if t is None:
            t = self.readers[self.base].get(tensor).to(self.device, self._torch.float32).contiguous()
            if self.keep:
                self._base[tensor] = t
        return t

    def _delta_t(self, model: str, tensor: str) -> Any:
        if self._prefetch is not None:
            self._adopt()
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

    def _sorted_keys(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        """Sorted magnitude keys of δ for each (model, tensor), computed in one parallel call for
        those not kept yet."""
        import numpy as np

        from finrecipe import _core

        if self._prefetch is not None:
            self._adopt()
        out = {k: self._keys[k] for k in pairs if k in self._keys}
        todo = [k for k in dict.fromkeys(pairs) if k not in out]
        if todo:
            ds = [self._delta_t(m, t).reshape(-1).numpy() for m, t in todo]
            ks = [np.empty(d.size, dtype=np.uint32) for d in ds]
            _core.sort_magnitudes(ds, ks, threads=self.threads)
            for k, v in zip(todo, ks, strict=True):
                out[k] = v
                if self.keep:
                    self._keys[k] = v
        return out

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
        entries = info.plan["tensors"]
        if not all(self._supported(e, names) for e in entries):
            self._apply_core(cfg, seed)
            return "core"
        torch = self._torch
        with torch.no_grad():
            if self.device.type == "cpu" and all(self._cpu_ok(e) for e in entries):
                self._apply_cpu(entries, names)
            else:
                for entry in entries:
                    self._merge_tensor(entry, names)
        return "memory"

    def _supported(self, e: Mapping[str, Any], names: list[str]) -> bool:
        """Whether an entry of the plan is one this module merges exactly as the core does."""
        known = {"name", "kernel", "out_dtype", "base", "sources", "params", "compute_dtype"}
        if set(e) - known or e["kernel"] not in IN_MEMORY or e.get("compute_dtype", "F32") != "F32":
            return False
        if e["out_dtype"] not in _DTYPES or names[e["base"]["model"]] != self.base:
            return False
        p = e["params"]
        if set(p) - {"lambda", "normalize", "rescale"} or p.get("rescale", False):
            return False
        name = e["name"]
        if e["base"]["tensor"] != name or name not in self.targets:
            return False
        allowed = {"weight"} if e["kernel"] == "task_arithmetic" else {"weight", "density"}
        return all(s["tensor"] == name and not set(s["params"]) - allowed for s in e["sources"])

    def _cpu_ok(self, e: Mapping[str, Any]) -> bool:
        t = self.targets[e["name"]]
        return bool(t.dtype == self._torch.float32 and t.is_contiguous())

    def _apply_cpu(self, entries: list[Mapping[str, Any]], names: list[str]) -> None:
        from finrecipe import _core

        def need(es: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
            return [(names[s["model"]], s["tensor"]) for e in es if e["kernel"] == "ties"
                    for s in e["sources"] if float(s["params"].get("density", 1.0)) < 1.0]

        # kept: every tensor's keys in one parallel call; else per tensor (memory stays bounded)
        keys = self._sorted_keys(need(entries)) if self.keep else {}
        for e in entries:
            name = e["name"]
            srcs = e["sources"]
            ties = e["kernel"] == "ties"
            if ties and not self.keep:
                keys = self._sorted_keys(need([e]))
            dens = [float(s["params"].get("density", 1.0)) for s in srcs] if ties else None
            _core.merge_into(
                e["kernel"], self.targets[name].numpy(), self._base_t(name).numpy(),
                [self._delta_t(names[s["model"]], s["tensor"]).numpy() for s in srcs],
                [float(s["params"]["weight"]) for s in srcs], bool(e["params"]["normalize"]),
                float(e["params"]["lambda"]), e["out_dtype"], densities=dens,
                sorted_keys=[keys.get((names[s["model"]], s["tensor"])) for s in srcs] if ties else None,
                threads=self.threads)

    def _merge_tensor(self, entry: Mapping[str, Any], names: list[str]) -> None:
        """The torch path (GPU): the core's operations in its order, as whole-tensor passes."""
        torch = self._torch
        name = entry["name"]
        target = self.targets[name]
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
                    mixed.add_(torch.mul(d, w))
            assert mixed is not None
            if p["normalize"]:
                tw = torch.tensor(ws, dtype=torch.float32).sum().item()
                mixed.div_(1.0 if abs(tw) < 1e-8 else tw)
        else:  # ties
            wds = []
            for s in entry["sources"]:
                w = float(s["params"]["weight"])
                ws.append(w)
                d = self._delta_t(names[s["model"]], s["tensor"])
                dens = float(s["params"].get("density", 1.0))
                if dens < 1.0:
                    n = d.numel()
                    k = min(max(int(math.floor(dens * n)), 1), n) if dens > 0.0 else 0
                    keep = (self._ranks(names[s["model"]], s["tensor"], d) < k).reshape(d.shape)
                    wds.append(torch.where(keep, d, 0.0) * w)
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
                        div.add_(agree.to(torch.float32).mul_(w))
            assert mixed is not None
            if div is not None:
                div = torch.where(div == 0.0, 1.0, div)
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
        """Bytes held for reuse (base, task vectors, TIES ranks or sorted keys)."""
        tot = 0
        for d in (self._base, self._delta, self._rank, self._keys):
            for t in d.values():
                tot += int(t.nbytes)
        return tot


def fp32_bytes(models: Mapping[str, Path], base: str, *, sorted_keys: bool = False) -> int:
    """Bytes that keeping the base and every task vector in float32 needs (estimated from headers),
    with `sorted_keys` plus TIES's sorted magnitude keys (4 bytes per element of each task vector)."""
    from finrecipe.merge import read_model

    info = read_model(models[base])
    arrays = len(models) + (len(models) - 1 if sorted_keys else 0)
    return 4 * int(info.num_params) * arrays


__all__ = ["IN_MEMORY", "InMemoryMerger", "Prefetch", "fp32_bytes"]
