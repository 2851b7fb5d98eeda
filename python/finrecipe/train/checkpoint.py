"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

``<work>/ckpt/step-<N>/`` holds the DCP shards of the model and optimizer (every rank writes its
own), ``rng-rank<r>.pt`` (CPU/CUDA/numpy/python RNG states of rank r) and ``meta.json`` (step, data
position, tokens seen, elapsed time...), written last. A checkpoint is written into
``tmp-step-<N>`` and renamed when complete, so a kill leaves either the old set or the new one;
only the newest ``keep`` are kept. The scheduler has no state of its own: the LR is a function of
the step.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from finrecipe.errors import FormatError
from finrecipe.train.distributed import Dist
from finrecipe.util.fs import fsync_dir, fsync_tree

_STEP_RE = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    def __init__(self, work_dir: Path, d: Dist, keep: int = 2) -> None:
        self.root = work_dir / "ckpt"
        self.d = d
        self.keep = keep

    def _complete(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        done = self._complete()
        return done[-1][1] if done else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
        step = int(meta["step"])
        tmp = self.root / f"tmp-step-{step}"
        final = self.root / f"step-{step}"
        if self.d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.d.barrier()
        msd, osd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.d.rank}.pt")
        self.d.barrier()
        if self.d.is_main:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)
            for _s, old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FormatError(f"{path / 'meta.json'}: unreadable checkpoint metadata ({e}); delete "
                              f"{path} to resume from an older checkpoint") from None
        msd, osd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": msd, "optim": osd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng-rank{self.d.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return meta

    def clean_partial(self) -> None:
        if self.d.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith("tmp-step-"):
                    shutil.rmtree(p, ignore_errors=True)
        self.d.barrier()
