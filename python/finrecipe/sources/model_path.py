"""`models: {NAME: {path: DIR}}`: a local Hugging Face model directory, keyed by its content.

A directory with only pickle weights is refused unless `allow_pickle: true`; then it is converted
once to safetensors into the node's directory (`torch.load(weights_only=True)`: no code runs)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finrecipe.node import CheckContext, NodeKind, Resolution, ResolveContext, register
from finrecipe.sources.convert import CONVERT_VERSION, convert_pickle_model, has_safetensors, pickle_weights
from finrecipe.sources.specs import ModelSource
from finrecipe.types import InputRef, ModelRef, Request, StageContext, StageResult
from finrecipe.util.content import digest, tree_digest


def _rel(p: Path, base: Path) -> str:
    return Path(os.path.relpath(p, base)).as_posix()


def remote_code_request(name: str, config: ModelSource) -> list[Request]:
    if not config.trust_remote_code:
        return []
    return [Request("remote_code", name, f"models.{name}: trust_remote_code: true runs the model "
                    "directory's own Python code", f"--allow-remote-code {name}")]


def model_dir(config: ModelSource, base_dir: Path) -> Path:
    assert config.path is not None
    return (base_dir / config.path).absolute()


@register
class PathModel(NodeKind[ModelSource]):
    type = "path"
    section = "models"
    Config = ModelSource

    def resolve(self, config: ModelSource, rc: ResolveContext) -> Resolution:
        from finrecipe import sources

        p = model_dir(config, rc.base_dir(("path",)))
        if not p.is_dir():
            raise rc.error(f"model directory not found: {p}", ("path",))
        d, files = tree_digest(p, rc.shas, (*sources.MODEL_PATTERNS, *sources.PICKLE_PATTERNS))
        if not files:
            raise rc.error(f"{p} holds no model files (*.safetensors, config.json, ...)", ("path",))
        if has_safetensors(p) or any(p.glob("*.safetensors.index.json")):
            # headers and shard index validated now (a hostile header, or an index entry that
            # leaves the directory, is refused by name before any stage reads the model)
            from finrecipe.merge import read_model

            read_model(p)
        material: dict[str, Any] = {"source": "path", "content": d}
        problem = sources.model_files_problem(rc.node, str(p), p, allow_pickle=config.allow_pickle) \
            if not has_safetensors(p) and pickle_weights(p) else None
        if problem:
            raise rc.error(problem, ("path",))
        if not has_safetensors(p) and pickle_weights(p):  # allow_pickle: converted once into the workdir
            material["convert"] = CONVERT_VERSION
            return Resolution(digest(material), material, lock_entry={"path": _rel(p, rc.recipe_dir), "content": d},
                              size=sum(f["size"] for f in files), facts={"path": str(p)})
        return Resolution(digest(material), material,
                          local_output=ModelRef(rc.node, p, trust_remote_code=config.trust_remote_code),
                          lock_entry={"path": _rel(p, rc.recipe_dir), "content": d},
                          size=sum(f["size"] for f in files))

    def check(self, config: ModelSource, inputs: Mapping[str, InputRef], cc: CheckContext | None = None
              ) -> str | None:
        assert cc is not None
        p = model_dir(config, cc.base_dir(("path",)))
        if not p.is_dir():
            raise cc.error(f"model directory not found: {p}", ("path",))
        return None

    def run(self, config: ModelSource, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        with ctx.progress.task(f"{ctx.node}: pickle → safetensors", total=None):
            convert_pickle_model(Path(ctx.facts["path"]), out_dir / "model", overwrite=True)
        return StageResult(model_dir=out_dir / "model")

    def offline_output(self, name: str, config: ModelSource, cc: CheckContext) -> InputRef | None:
        return ModelRef(name, model_dir(config, cc.base_dir(("path",))))

    def requests(self, config: ModelSource, cc: CheckContext) -> list[Request]:
        return [*cc.path_request(model_dir(config, cc.base_dir(("path",))), ("path",)),
                *remote_code_request(cc.node, config)]

    def trusts_remote_code(self, config: ModelSource) -> bool:
        return config.trust_remote_code
