"""`datasets: {NAME: {files: GLOB | [GLOBS], format, text_field, weight}}`: local files, keyed by
their sha256."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finrecipe.errors import DataError, RecipeError
from finrecipe.node import CheckContext, KeyPath, NodeKind, Resolution, ResolveContext, register
from finrecipe.sources.specs import DatasetFormat, DatasetSpec, infer_format
from finrecipe.types import DatasetRef, InputRef, Request
from finrecipe.util.content import digest

_FILES: KeyPath = ("files",)


def missing_files_msg(e: DataError, description: str | None) -> str:
    """The glob error, with the dataset's `description:` (what to put there) when it has one."""
    msg = str(e)
    if description and description.strip():
        msg += f"; expected: {' '.join(description.split())}"
    return msg


def infer(files: list[Path], error: Any) -> DatasetFormat:
    """The one format the files' suffixes agree on, else a RecipeError from `error(msg)`."""
    fmts = {infer_format(f.name) for f in files}
    if None in fmts or len(fmts) != 1:
        raise error("cannot infer the format of " + ", ".join(f.name for f in files[:3])
                    + "; set 'format:' to jsonl, parquet or text")
    fmt = fmts.pop()
    assert fmt is not None
    return fmt


def _rel(p: Path, base: Path) -> str:
    return Path(os.path.relpath(p, base)).as_posix()


def _expand(config: DatasetSpec, base: Path, error: Any) -> list[Path]:
    from finrecipe import sources

    try:
        return sources.expand_globs(config.patterns, base)
    except DataError as e:
        raise error(missing_files_msg(e, config.description)) from None


@register
class FilesDataset(NodeKind[DatasetSpec]):
    type = "files"
    section = "datasets"
    Config = DatasetSpec
    provides = "dataset"

    @staticmethod
    def claims(entry: Mapping[str, Any]) -> bool:
        return "files" in entry and "hub" not in entry

    def resolve(self, config: DatasetSpec, rc: ResolveContext) -> Resolution:
        base = rc.base_dir(_FILES)

        def err(msg: str) -> RecipeError:
            return rc.error(msg, _FILES)

        files = _expand(config, base, err)
        fmt = config.format or infer(files, err)
        hashed = []
        for f in files:
            sha, size = rc.shas.sha256(f)
            hashed.append((f, sha, size))
        material = {"source": "files", "format": fmt, "text_field": config.text_field, "weight": config.weight,
                    "files": [{"name": _rel(f, base), "sha256": sha} for f, sha, _ in hashed]}
        ref = DatasetRef(rc.node, tuple(f for f, _, _ in hashed), fmt, config.text_field, config.weight,
                         tuple(s for _, s, _ in hashed))
        entry = {"files": [{"path": _rel(f, rc.recipe_dir), "size": size, "sha256": sha}
                           for f, sha, size in hashed]}
        return Resolution(digest(material), material, local_output=ref, lock_entry=entry,
                          size=sum(s for _, _, s in hashed))

    def requests(self, config: DatasetSpec, cc: CheckContext) -> list[Request]:
        import glob

        base = cc.base_dir(_FILES)
        out: list[Request] = []
        for pat in config.patterns:
            full = Path(pat) if os.path.isabs(pat) else base / pat
            # the fixed part of the pattern (up to its first wildcard) must lie inside the roots
            fixed = Path(*[part for part in full.parts[: next((i for i, q in enumerate(full.parts)
                                                                 if glob.has_magic(q)), len(full.parts))]])
            out.extend(r for r in cc.path_request(fixed, _FILES) if r.what not in {x.what for x in out})
        return out

    def check(self, config: DatasetSpec, inputs: Mapping[str, InputRef], cc: CheckContext | None = None
              ) -> str | None:
        assert cc is not None
        _expand(config, cc.base_dir(_FILES), lambda msg: cc.error(msg, _FILES))
        return None
