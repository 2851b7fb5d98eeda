"""Content addressing: canonical JSON, node keys, file hashes (cached), markers and state.

A node's key is the sha256 of the canonical JSON of its "material" (type, version, config, input
keys, content hashes): sorted keys, no whitespace, no absolute paths, so keys are the same in any
process, on any machine and wherever the checkout lives.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finrecipe.errors import IoError

KEY_LEN = 16  # hex digits of sha256 used as the node key (and its directory name)
MARKER = "DONE.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:KEY_LEN]


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON to `path` via a temp file + fsync + rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=False, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IoError(f"{path}: cannot write: {e.strerror}") from None
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return None  # unreadable or half-written (cannot happen with write_json_atomic): ignore


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class ShaCache:
    """sha256 of files, remembered by (absolute path, size, mtime_ns) in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, list[Any]] = {}
        self._dirty = False
        if path is not None:
            d = read_json(path)
            if isinstance(d, dict):
                self._data = d

    def sha256(self, file: Path) -> tuple[str, int]:
        """(sha256 hex, size) of `file`."""
        ap = str(Path(file).absolute())
        try:
            st = os.stat(ap)
        except OSError as e:
            raise IoError(f"{ap}: cannot read: {e.strerror}") from None
        hit = self._data.get(ap)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2]), st.st_size
        sha = sha256_file(Path(ap))
        self._data[ap] = [st.st_size, st.st_mtime_ns, sha]
        self._dirty = True
        return sha, st.st_size

    def save(self) -> None:
        if self.path is not None and self._dirty:
            try:
                write_json_atomic(self.path, self._data, indent=None)
                self._dirty = False
            except IoError:
                pass  # a cache: losing it only costs time


def tree_files(root: Path, patterns: Iterable[str] | None = None) -> list[Path]:
    """Files under `root` (recursively, sorted, hidden entries skipped), filtered by fnmatch patterns."""
    import fnmatch

    pats = list(patterns) if patterns is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if pats is None or any(fnmatch.fnmatch(rel, pt) or fnmatch.fnmatch(fn, pt) for pt in pats):
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def tree_digest(root: Path, shas: ShaCache, patterns: Iterable[str] | None = None
                ) -> tuple[str, list[dict[str, Any]]]:
    """Content digest of a directory: names relative to `root` + sha256 of each file."""
    files = []
    for p in tree_files(root, patterns):
        sha, size = shas.sha256(p)
        files.append({"name": p.relative_to(root).as_posix(), "size": size, "sha256": sha})
    return digest(files), files


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
