"""`type: merge`: a mergekit-style merge of models named in the recipe (a thin adapter over
`finrecipe.merge`).

    stages:
      domain_instruct:
        type: merge
        merge_method: task_arithmetic
        base_model: base
        models: [{model: instruct}, {model: domain_cpt}]
        dtype: float32
        out_dtype: bfloat16
        seed: 0                 # DARE masks (not a mergekit key)
        out_shard_size: 5000000000
        threads: 0              # not part of the cache key

Every key except `type`, `seed`, `out_shard_size` and `threads` is the mergekit config, checked
strictly by `finrecipe.merge.MergeConfig`, with recipe model names in `model:`, `base_model:` and
`tokenizer_source:`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, model_validator

from finrecipe.stages.base import (
    DatasetRef,
    InputKind,
    ModelRef,
    StageContext,
    StageKind,
    StageResult,
    register,
)

OWN_KEYS = ("seed", "out_shard_size", "threads")


class MergeStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    merge: Any = Field(description="the validated finrecipe.merge.MergeConfig")
    seed: StrictInt = 0
    out_shard_size: StrictInt = Field(default=5_000_000_000, gt=0)
    threads: StrictInt = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any, info: ValidationInfo) -> Any:
        from finrecipe.merge import MergeConfig

        if not isinstance(data, Mapping):
            return data
        if isinstance(data.get("merge"), MergeConfig):
            return data
        rest = dict(data)
        own = {k: rest.pop(k) for k in OWN_KEYS if k in rest}
        ctx = info.context or {}
        cfg = MergeConfig.from_dict(rest, file=ctx.get("file"), positions=ctx.get("positions"),
                                    prefix=tuple(ctx.get("prefix", ())))
        return {"merge": cfg, **own}


def _names(config: BaseModel) -> list[str]:
    assert isinstance(config, MergeStageConfig)
    cfg = config.merge
    names = list(cfg.model_names())
    tok = cfg.tokenizer_source_name
    if tok is not None and tok not in ("base", "union") and tok not in names:
        names.append(tok)
    return names


@register
class MergeStage(StageKind):
    type = "merge"
    version = "1"
    Config = MergeStageConfig
    produces_model = True

    def inputs(self, config: BaseModel) -> Sequence[tuple[str, InputKind]]:
        return [(n, "model") for n in _names(config)]

    def cache_config(self, config: BaseModel) -> Any:
        assert isinstance(config, MergeStageConfig)
        return {"merge": config.merge.model_dump(mode="json", exclude_none=True),
                "seed": config.seed, "out_shard_size": config.out_shard_size}

    def _paths(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef]) -> dict[str, Path] | None:
        paths = {}
        for n in _names(config):
            ref = inputs.get(n)
            if not isinstance(ref, ModelRef) or not ref.path.is_dir():
                return None
            paths[n] = ref.path
        return paths

    def check(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef]) -> None:
        from finrecipe.merge import validate_merge

        assert isinstance(config, MergeStageConfig)
        paths = self._paths(config, inputs)
        if paths is not None:
            validate_merge(config.merge, paths)

    def estimate_output_bytes(self, config: BaseModel,
                              inputs: Mapping[str, ModelRef | DatasetRef]) -> int | None:
        from finrecipe.merge import validate_merge

        assert isinstance(config, MergeStageConfig)
        paths = self._paths(config, inputs)
        if paths is None:
            return None
        return int(validate_merge(config.merge, paths).out_bytes)

    def run(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe.merge import run_merge

        assert isinstance(config, MergeStageConfig)
        paths = {n: ref.path for n, ref in inputs.items() if isinstance(ref, ModelRef)}
        res = run_merge(config.merge, out_dir / "model", paths, threads=config.threads,
                        out_shard_size=config.out_shard_size, seed=config.seed, overwrite=True,
                        progress=ctx.progress)
        ctx.logger.info("merge %s: %d tensors, %d bytes in %.2f s (%s backend)", ctx.node, res.tensors,
                        res.total_bytes, res.seconds, res.backend)
        return StageResult(model_dir=out_dir / "model",
                           metrics={"merge_method": res.method, "tensors": res.tensors,
                                    "output_bytes": res.total_bytes, "merge_seconds": round(res.seconds, 3),
                                    "backend": res.backend})
