"""A pure-Python safetensors reader with the checks of the Rust core's `read_model`: header size
bounds, UTF-8 JSON object, known dtypes and their byte sizes, contiguous non-overlapping offsets
covering the data exactly, the file length, and a shard index that names plain files of the model
directory and agrees with the shards both ways. Returns `finrecipe.merge.ModelInfo`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from finrecipe.errors import FormatError, IoError
from finrecipe.merge.headers import ModelInfo, TensorInfo

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("BF16", "F16", "F32")
MAX_HEADER = 100_000_000
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _read_file_header(fp: Path) -> tuple[dict[str, Any], int]:
    try:
        size = fp.stat().st_size
        with open(fp, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{fp}: file too short ({size} bytes) to be safetensors")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise FormatError(f"{fp}: header length {n} is beyond the file ({size} bytes) or the "
                                  f"{MAX_HEADER}-byte limit; the file is truncated or not safetensors")
            raw = f.read(n)
    except FileNotFoundError:
        raise IoError(f"{fp}: file not found") from None
    except PermissionError:
        raise IoError(f"{fp}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{fp}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise FormatError(f"{fp}: header is not a JSON object")
    return header, size - 8 - n


def _parse_file(fp: Path, fname: str) -> tuple[list[TensorInfo], dict[str, str]]:
    header, data_len = _read_file_header(fp)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{fp}: __metadata__ must map strings to strings")
    out = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise FormatError(f"{fp}: tensor {name!r}: entry is not an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in DTYPE_SIZES:
            raise FormatError(f"{fp}: tensor {name!r}: unknown dtype {dt!r}")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise FormatError(f"{fp}: tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offs) or offs[0] > offs[1]):
            raise FormatError(f"{fp}: tensor {name!r}: bad data_offsets {offs!r}")
        expect = math.prod(shape) * DTYPE_SIZES[dt]
        if offs[1] - offs[0] != expect:
            raise FormatError(f"{fp}: tensor {name!r}: data_offsets span {offs[1] - offs[0]} bytes but "
                              f"{dt}{shape} needs {expect}")
        out.append(TensorInfo(name, dt, tuple(shape), fname, (offs[0], offs[1])))
    out.sort(key=lambda t: (t.data_offsets[0], t.data_offsets[1]))
    pos = 0
    for t in out:
        if t.data_offsets[0] != pos:
            raise FormatError(f"{fp}: tensor {t.name!r}: data_offsets {list(t.data_offsets)} leave a gap "
                              f"or overlap (expected start {pos})")
        pos = t.data_offsets[1]
    if pos != data_len:
        raise FormatError(f"{fp}: tensors cover {pos} data bytes but the file holds {data_len}; "
                          "the file is truncated or corrupt")
    return out, meta


def py_read_model(path: str | Path) -> ModelInfo:
    """Validate and describe a model directory or one file, like `finrecipe._core.read_model`."""
    path = Path(path)
    if path.is_file():
        files = [path.name]
        root = path.parent
    elif (path / INDEX).is_file():
        root = path
        try:
            idx = json.loads((path / INDEX).read_text(encoding="utf-8"))
            wmap = idx["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{path / INDEX}: not a valid safetensors index ({e})") from None
        files = sorted(set(wmap.values()))
        for f in files:
            if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", ".."):
                raise FormatError(f"{path / INDEX}: bad shard file name {f!r}")
    elif (path / SINGLE).is_file():
        root, files, wmap = path, [SINGLE], None
    elif path.is_dir():
        raise FormatError(f"{path}: no {SINGLE} or {INDEX} in this directory")
    else:
        raise IoError(f"{path}: no such file or directory")
    tensors: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    for f in files:
        infos, m = _parse_file(root / f, f)
        meta = meta or m
        for t in infos:
            if t.name in tensors:
                raise FormatError(f"{root / f}: tensor {t.name!r} also appears in {tensors[t.name].file}")
            tensors[t.name] = t
    if path.is_dir() and (path / INDEX).is_file():
        for name, f in wmap.items():
            if name not in tensors or tensors[name].file != f:
                raise FormatError(f"{path / INDEX}: tensor {name!r} is mapped to {f} but not found there")
        if len(wmap) != len(tensors):
            extra = sorted(set(tensors) - set(wmap))[:3]
            raise FormatError(f"{path / INDEX}: shards hold tensors missing from weight_map: {extra}")
    return ModelInfo(path=root, files=files, tensors=tensors, metadata=meta)
