"""Reading and validating safetensors headers of a model directory (no tensor data is read).

`read_model(path)` is the one reader every part of finrecipe uses for safetensors checkpoints
(merge, inspect, analysis, evaluation): the Rust core validates every header (size bounds, JSON,
dtype byte sizes, contiguous non-overlapping offsets covering the data exactly, file length) and
the shard index (plain file names inside the model directory only, both ways consistent), and
raises `FormatError` (exit code 2) naming the file for anything hostile. It returns `ModelInfo`
with tensors in a deterministic order (shard order, then data offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


@dataclass
class ModelInfo:
    path: Path
    files: list[str]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def read_model(path: str | Path) -> ModelInfo:
    """Validate and describe a model directory (single file or shards + index) or one file."""
    from finrecipe import _core

    p = Path(path)
    d = _core.read_model(str(p))
    root = p if p.is_dir() else p.parent
    tensors = {}
    raw = d["tensors"]
    for name, t in raw.items():
        tensors[name] = TensorInfo(name, t["dtype"], tuple(t["shape"]), t["file"],
                                   tuple(t["data_offsets"]))  # type: ignore[arg-type]
    files = list(d["files"])
    order = {f: i for i, f in enumerate(files)}
    items = sorted(tensors.values(), key=lambda t: (order.get(t.file, 0), t.data_offsets[0]))
    return ModelInfo(path=root, files=files, tensors={t.name: t for t in items},
                     metadata=dict(d.get("metadata") or {}))
