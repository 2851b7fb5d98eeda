"""`datasets: {NAME: {hub: ORG/NAME, revision: REV, files: [GLOBS]}}`: a dataset repository on the
Hugging Face hub, keyed by the commit the revision resolves to; the files live in the Hugging Face
cache's snapshot, and their list (with sha256) goes into the marker and the lockfile."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finrecipe.node import NodeKind, Resolution, ResolveContext, register
from finrecipe.sources.dataset_files import infer
from finrecipe.sources.model_hub import locked_commit
from finrecipe.sources.specs import DatasetSpec
from finrecipe.types import DatasetRef, InputRef, StageContext, StageResult
from finrecipe.util.content import ShaCache, digest


@register
class HubDataset(NodeKind[DatasetSpec]):
    type = "hub"
    section = "datasets"
    Config = DatasetSpec
    provides = "dataset"
    network = True

    def resolve(self, config: DatasetSpec, rc: ResolveContext) -> Resolution:
        assert config.hub is not None
        commit = locked_commit(rc, config.hub, config.revision)
        material = {"source": "hub", "repo": config.hub, "commit": commit, "patterns": config.patterns,
                    "format": config.format, "text_field": config.text_field, "weight": config.weight}
        return Resolution(digest(material), material,
                          lock_entry={"hub": config.hub, "revision": config.revision, "commit": commit})

    def run(self, config: DatasetSpec, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe import sources

        assert config.hub is not None
        snap, files = sources.fetch_hub_dataset(config.hub, str(ctx.material["commit"]), config.patterns)
        shas = ShaCache(None)
        listed = []
        for f in files:
            sha, size = shas.sha256(f)
            listed.append({"path": Path(os.path.relpath(f, snap)).as_posix(), "size": size, "sha256": sha})
        return StageResult(extra={"dataset_files": listed, "snapshot": str(snap)})

    def output(self, name: str, config: DatasetSpec, out_dir: Path, result: StageResult,
               trust_remote_code: bool) -> InputRef | None:
        files = result.extra.get("dataset_files") or []
        # the Hugging Face cache's snapshot (older workdirs: a copy under out_dir/data)
        root = Path(result.extra["snapshot"]) if result.extra.get("snapshot") else out_dir / "data"
        paths = tuple(root / f["path"] for f in files)

        def err(msg: str) -> Exception:
            from finrecipe.errors import RecipeError

            return RecipeError(msg, path=f"datasets.{name}.files")

        fmt = config.format or infer(list(paths), err)
        return DatasetRef(name, paths, fmt, config.text_field, config.weight,
                          tuple(f["sha256"] for f in files))

    def lock_entry(self, config: DatasetSpec, res: Resolution, result: StageResult | None
                   ) -> dict[str, Any] | None:
        entry = dict(res.lock_entry or {})
        if result is not None and result.extra.get("dataset_files"):
            entry["files"] = [dict(f) for f in result.extra["dataset_files"]]
        return entry

