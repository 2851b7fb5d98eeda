"""Training checkpoints in safe formats (safetensors and JSON, no pickle), written atomically.

``<work>/ckpt/step-<N>/`` holds, for every rank ``r`` (each rank writes its own shard of the
FSDP2-sharded state, so a resume needs the same number of processes)::

    model-rank<r>.safetensors   the rank's local model tensors (keys: parameter names)
    optim-rank<r>.safetensors   the rank's local optimizer state (keys: "<param>::<state key>")
    rng-rank<r>.safetensors     torch (and CUDA) RNG states, numpy's key array
    rank-<r>.json               numpy/python RNG scalars, non-tensor optimizer state, and the
                                size and sha256 of the rank's files
    manifest.json               written last by rank 0: format, step, data position, tokens seen,
                                elapsed time, the plan it belongs to, and size + sha256 of every
                                other file of the checkpoint

A checkpoint is written into ``tmp-step-<N>`` and renamed when complete, so a kill leaves either
the old set or the new one; only the newest ``keep`` are kept. On resume the newest checkpoint
whose manifest and files verify is used; one that does not (truncated, corrupt, written by
something else or by an older finrecipe) is moved aside to ``bad-step-<N>`` with a warning and
the previous one is tried. Nothing in a checkpoint is unpickled. The scheduler has no state of
its own: the LR is a function of the step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from finrecipe.errors import IoError, StageError
from finrecipe.train.distributed import Dist
from finrecipe.util.fs import fsync_dir, write_json_atomic

log = logging.getLogger("finrecipe.train")

FORMAT = "finrecipe.checkpoint/1"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_SEP = "::"


class BadCheckpoint(Exception):
    """A checkpoint that cannot be used (the message says why)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """safetensors file of CPU copies; I/O failures become one-line IoErrors."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, str(path))
    except SafetensorError as e:
        raise IoError(f"{path}: cannot write: {e}; free disk space or choose a writable workdir") from None


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------ RNG
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = st
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
               "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    return tensors, scalars


def _set_rng_state(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        states = [tensors[f"cuda.{i}"] for i in range(n) if f"cuda.{i}" in tensors]
        if len(states) == n:
            torch.cuda.set_rng_state_all(states)
    npst = scalars["numpy"]
    np.random.set_state((str(npst["kind"]), tensors["numpy.keys"].numpy().astype(np.uint32),
                         int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached"])))
    py = scalars["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))


# ------------------------------------------------------------------------------------ checkpointer
class Checkpointer:
    def __init__(self, work_dir: Path, d: Dist, keep: int = 2) -> None:
        self.root = work_dir / "ckpt"
        self.d = d
        self.keep = keep

    def steps(self) -> list[tuple[int, Path]]:
        """Renamed-into-place checkpoints, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    # ---------------------------------------------------------------------------------- save
    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
        step = int(meta["step"])
        tmp = self.root / f"tmp-step-{step}"
        final = self.root / f"step-{step}"
        r = self.d.rank
        if self.d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.d.barrier()
        msd, osd = get_state_dict(model, optimizer)
        save_tensors({k: _local(v) for k, v in msd.items() if isinstance(v, torch.Tensor)},
                     tmp / f"model-rank{r}.safetensors")
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_other: dict[str, Any] = {}
        ostate: dict[str, dict[str, Any]] = dict(osd["state"])  # type: ignore[arg-type]
        for fqn, st in ostate.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    opt_tensors[f"{fqn}{_SEP}{k}"] = _local(v)
                else:
                    opt_other[f"{fqn}{_SEP}{k}"] = v
        save_tensors(opt_tensors, tmp / f"optim-rank{r}.safetensors")
        rng_t, rng_s = _rng_state()
        save_tensors(rng_t, tmp / f"rng-rank{r}.safetensors")
        files = {f"{kind}-rank{r}.safetensors": _file_entry(tmp / f"{kind}-rank{r}.safetensors")
                 for kind in ("model", "optim", "rng")}
        write_json_atomic(tmp / f"rank-{r}.json", {"rank": r, "rng": rng_s, "optim_other": opt_other,
                                                   "files": files})
        self.d.barrier()
        if self.d.is_main:
            all_files: dict[str, Any] = {}
            for rr in range(self.d.world):
                part = json.loads((tmp / f"rank-{rr}.json").read_text())
                all_files.update(part["files"])
                all_files[f"rank-{rr}.json"] = _file_entry(tmp / f"rank-{rr}.json")
            write_json_atomic(tmp / MANIFEST, {"format": FORMAT, **meta, "world": self.d.world,
                                               "files": all_files}, indent=1)
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)
            for _s, old in self.steps()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()
        return final

    # ---------------------------------------------------------------------------------- load
    def _verify(self, path: Path) -> dict[str, Any]:
        """The manifest when it and this rank's files check out; BadCheckpoint otherwise."""
        try:
            man = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise BadCheckpoint("no manifest.json (incomplete, or not written by this finrecipe)") from None
        except (OSError, ValueError) as e:
            raise BadCheckpoint(f"unreadable manifest.json ({e})") from None
        if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("files"), dict):
            raise BadCheckpoint(f"manifest.json is not a {FORMAT} manifest")
        if int(man.get("world", -1)) != self.d.world:
            raise BadCheckpoint(f"written by {man.get('world')} processes, this run has {self.d.world}")
        r = self.d.rank
        mine = [f"{k}-rank{r}.safetensors" for k in ("model", "optim", "rng")] + [f"rank-{r}.json"]
        for name in mine:
            want = man["files"].get(name)
            f = path / name
            if not isinstance(want, dict):
                raise BadCheckpoint(f"manifest.json does not list {name}")
            if not f.is_file() or f.stat().st_size != want.get("size"):
                raise BadCheckpoint(f"{name}: missing or truncated")
            if sha256_file(f) != want.get("sha256"):
                raise BadCheckpoint(f"{name}: content does not match its sha256 in manifest.json")
        return man

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore the newest usable checkpoint; returns its manifest, or None when there is none."""
        for _step, path in reversed(self.steps()):
            why = None
            try:
                man = self._verify(path)
            except BadCheckpoint as e:
                why = str(e)
            if self.d.any_true(why is not None):
                log.warning("%s: not resumable (%s); trying the previous checkpoint", path,
                            why or "bad on another rank")
                self.d.barrier()
                if self.d.is_main:
                    aside = path.with_name("bad-" + path.name)
                    shutil.rmtree(aside, ignore_errors=True)
                    path.rename(aside)
                self.d.barrier()
                continue
            self._restore(path, model, optimizer)
            return man
        return None

    def _restore(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from safetensors.torch import load_file

        r = self.d.rank
        part = json.loads((path / f"rank-{r}.json").read_text())
        mt = load_file(str(path / f"model-rank{r}.safetensors"))
        ot = load_file(str(path / f"optim-rank{r}.safetensors"))
        msd, osd = get_state_dict(model, optimizer)  # initialises the optimizer state to fill

        def fill(dst: Any, src: torch.Tensor | None, name: str) -> None:
            loc = _local(dst)
            if src is None or tuple(src.shape) != tuple(loc.shape) or src.dtype != loc.dtype:
                raise StageError(f"{path}: {name} does not match the model being trained; delete "
                                 f"{path.parent} to start over")
            with torch.no_grad():
                loc.copy_(src)

        for k, v in msd.items():
            if isinstance(v, torch.Tensor):
                fill(v, mt.get(k), k)
        ostate: dict[str, dict[str, Any]] = dict(osd["state"])  # type: ignore[arg-type]
        for fqn, st in ostate.items():
            for k in list(st):
                key = f"{fqn}{_SEP}{k}"
                if isinstance(st[k], torch.Tensor):
                    fill(st[k], ot.get(key), key)
                elif key in part["optim_other"]:
                    st[k] = part["optim_other"][key]
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
        _set_rng_state(load_file(str(path / f"rng-rank{r}.safetensors")), part["rng"])

    def clean_partial(self) -> None:
        if self.d.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith("tmp-step-"):
                    shutil.rmtree(p, ignore_errors=True)
        self.d.barrier()
