"""Content addressing: canonical JSON, digests, file hashes (cached by path, size and mtime) and
directory digests. Keys made here are the same in any process, on any machine and wherever the
checkout lives (sorted keys, no whitespace, no absolute paths)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finrecipe.errors import FormatError, IoError
from finrecipe.util.fs import write_json_atomic

KEY_LEN = 16  # hex digits of sha256 used as a node key (and its directory name)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:KEY_LEN]


def read_json(path: Path) -> Any | None:
    """Parsed JSON, or None when the file is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def hf_blob_link(p: Path) -> bool:
    """Whether `p` is a link of a Hugging Face cache snapshot into its own repository's blobs
    (`<repo>/snapshots/<rev>/.../name` → `<repo>/blobs/<hash>`, a regular file): the one kind of
    link a model or dataset directory may hold."""
    try:
        if not p.is_symlink():
            return False
        target = p.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    parts = p.absolute().parts
    if "snapshots" not in parts:
        return False
    repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
    return target.parent == (repo / "blobs").resolve() and stat.S_ISREG(os.stat(target).st_mode)


def _refuse_irregular(p: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and hf_blob_link(p)):
        return
    what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
    raise FormatError(f"{p}: {what}; a model or dataset directory must hold regular files only (copy "
                      "the real file in place of the link)")


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
        """(sha256 hex, size) of the regular file `file` (links are not followed)."""
        ap = str(Path(file).absolute())
        try:
            st = os.lstat(ap)
        except OSError as e:
            raise IoError(f"{ap}: cannot read: {e.strerror}") from None
        _refuse_irregular(Path(ap), st)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(ap)  # a Hugging Face cache blob: key the hash by the blob
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
    """Files under `root` (recursively, sorted, hidden entries skipped), filtered by fnmatch
    patterns. Links (but a Hugging Face cache snapshot's links into its blobs) and special files
    (FIFOs, devices, sockets) that match are refused by name: they could point anywhere, or hang."""
    import fnmatch

    pats = list(patterns) if patterns is not None else None
    out = []
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not descend into dir links
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if pats is None or any(fnmatch.fnmatch(rel, pt) or fnmatch.fnmatch(fn, pt) for pt in pats):
                try:
                    st = os.lstat(p)
                except OSError as e:
                    raise IoError(f"{p}: cannot read: {e.strerror}") from None
                _refuse_irregular(p, st)
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
