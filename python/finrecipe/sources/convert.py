"""Pickle-only checkpoints (`pytorch_model.bin`, sharded `.bin` + index) to safetensors, safely.

Each shard is read with `torch.load(weights_only=True)`, which builds tensors and plain containers
only and runs no code from the file; anything else in a shard is refused by name. The output has
the same tensor names, dtypes and shard structure (`pytorch_model-00001-of-00002.bin` →
`model-00001-of-00002.safetensors`, the index renamed and rewritten), plus every other file of the
directory (config, tokenizer) — written atomically: a complete directory or none.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finrecipe.errors import FormatError, IoError
from finrecipe.util.fs import atomic_dir

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
_SHARD = re.compile(r"^pytorch_model(-\d+-of-\d+)\.bin$")
CONVERT_VERSION = "1"


def pickle_weights(model_dir: Path) -> list[Path]:
    """The pickle weight files of a Hugging Face model directory (empty when there are none)."""
    if (model_dir / PICKLE_INDEX).is_file():
        try:
            index = json.loads((model_dir / PICKLE_INDEX).read_text(encoding="utf-8"))
            names = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{model_dir / PICKLE_INDEX}: not a weight index ({e})") from None
        for n in names:
            if "/" in n or "\\" in n or n in ("", ".", ".."):
                raise FormatError(f"{model_dir / PICKLE_INDEX}: shard {n!r} is outside the model directory")
        return [model_dir / n for n in names]
    if (model_dir / PICKLE_SINGLE).is_file():
        return [model_dir / PICKLE_SINGLE]
    return []


def has_safetensors(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors"))


def _target_name(name: str) -> str:
    if name == PICKLE_SINGLE:
        return "model.safetensors"
    m = _SHARD.match(name)
    if m:
        return f"model{m.group(1)}.safetensors"
    return Path(name).with_suffix(".safetensors").name


def _load(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # the legacy (pre-zip) format cannot be memory-mapped: read it whole
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FormatError(f"{path}: refused: it holds more than tensors, and loading it would run code "
                          f"from the file ({' '.join(str(e).split())[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise FormatError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise FormatError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; only plain "
                              "state dicts can be converted")
    return sd


def convert_pickle_model(src: Path, dest: Path, *, overwrite: bool = False,
                         on_shard: Callable[[str], None] | None = None) -> Path:
    """Convert the pickle weights of `src` into a safetensors model directory `dest`."""
    from safetensors.torch import save_file

    src = Path(src)
    if not src.is_dir():
        raise IoError(f"{src}: model directory not found")
    shards = pickle_weights(src)
    if not shards:
        raise FormatError(f"{src}: no pickle weights ({PICKLE_SINGLE} or {PICKLE_INDEX}) to convert")
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for shard in shards:
            if on_shard is not None:
                on_shard(shard.name)
            sd = _load(shard)
            seen: dict[tuple[int, int], str] = {}
            out: dict[str, Any] = {}
            for name, t in sd.items():
                t = t.contiguous()
                ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
                # safetensors stores no aliases: a tensor sharing storage (tied weights) is copied
                out[name] = t.clone() if ptr in seen or t.untyped_storage().nbytes() != t.nbytes else t
                seen.setdefault(ptr, name)
                total += t.numel() * t.element_size()
            target = _target_name(shard.name)
            try:
                save_file(out, str(tmp / target), metadata={"format": "pt"})
            except OSError as e:
                raise IoError(f"{dest}: cannot write {target}: {e.strerror or e}") from None
            weight_map.update(dict.fromkeys(out, target))
            del sd, out
        if (src / PICKLE_INDEX).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                               encoding="utf-8")
        skip = {s.name for s in shards} | {PICKLE_INDEX}
        for p in sorted(src.iterdir()):
            if p.name in skip or p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"):
                continue  # other pickles (optimizer states, training args) are not part of a model
            shutil.copy2(p, tmp / p.name)
    return dest
