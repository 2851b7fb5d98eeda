"""Content addressing: canonical JSON, node keys, file hashes (cached), markers and state.

A node's key is the sha256 of the canonical JSON of its "material" (type, version, config, input
keys, content hashes): sorted keys, no whitespace, no absolute paths, so keys are the same in any
process, on any machine and wherever the checkout lives.
"""

from __future__ import annotations

import json
from typing import Any

from finrecipe.util.content import (
    KEY_LEN,
    ShaCache,
    canonical_json,
    digest,
    read_json,
    sha256_file,
    tree_digest,
    tree_files,
)
from finrecipe.util.fs import write_json_atomic

MARKER = "DONE.json"

__all__ = ["KEY_LEN", "MARKER", "ShaCache", "canonical_json", "diff_material", "digest", "read_json",
           "sha256_file", "tree_digest", "tree_files", "write_json_atomic"]


def diff_material(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values ("a.b: 1 → 2")."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{p} added")
            elif k not in new:
                out.append(f"{p} removed")
            else:
                out.extend(diff_material(old[k], new[k], p))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (o, n) in enumerate(zip(old, new, strict=True)):
            out.extend(diff_material(o, n, f"{path}[{i}]"))
        return out
    if old == new:
        return []
    so, sn = _short(old), _short(new)
    return [f"{path or 'value'}: {so} → {sn}"]


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, sort_keys=True)
    return s if len(s) <= 40 else s[:37] + "..."
