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

from finrecipe.merge import MergeConfig
from finrecipe.node import CheckContext
from finrecipe.stages.base import StageKind, register
from finrecipe.types import InputKind, InputRef, ModelRef, StageContext, StageResult

OWN_KEYS = ("seed", "out_shard_size", "threads")


class MergeStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    merge: MergeConfig = Field(description="the validated mergekit config")
    seed: StrictInt = 0
    out_shard_size: StrictInt = Field(default=5_000_000_000, gt=0)
    threads: StrictInt = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any, info: ValidationInfo) -> Any:
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


def _names(config: MergeStageConfig) -> list[str]:
    cfg = config.merge
    names = list(cfg.model_names())
    tok = cfg.tokenizer_source_name
    if tok is not None and tok not in ("base", "union") and tok not in names:
        names.append(tok)
    return names


def _paths(config: MergeStageConfig, inputs: Mapping[str, InputRef]) -> dict[str, Path] | None:
    """Name -> directory of every input model, or None when one is not a local directory yet."""
    paths = {}
    for n in _names(config):
        ref = inputs.get(n)
        if not isinstance(ref, ModelRef) or not ref.path.is_dir():
            return None
        paths[n] = ref.path
    return paths


@register
class MergeStage(StageKind[MergeStageConfig]):
    type = "merge"
    version = "1"
    Config = MergeStageConfig
    provides = "model"

    def inputs(self, config: MergeStageConfig) -> Sequence[tuple[str, InputKind]]:
        return [(n, "model") for n in _names(config)]

    def cache_config(self, config: MergeStageConfig) -> Any:
        return {"merge": config.merge.model_dump(mode="json", exclude_none=True),
                "seed": config.seed, "out_shard_size": config.out_shard_size}

    def check(self, config: MergeStageConfig, inputs: Mapping[str, InputRef],
              cc: CheckContext | None = None) -> str | None:
        from finrecipe.merge import validate_merge

        paths = _paths(config, inputs)
        if paths is not None:
            validate_merge(config.merge, paths)
        return None

    def estimate_output_bytes(self, config: MergeStageConfig, inputs: Mapping[str, InputRef]) -> int | None:
        from finrecipe.merge import validate_merge

        paths = _paths(config, inputs)
        if paths is None:
            return None
        return int(validate_merge(config.merge, paths).out_bytes)

    def run(self, config: MergeStageConfig, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe.merge import run_merge

        paths = {n: ref.path for n, ref in inputs.items() if isinstance(ref, ModelRef)}
        res = run_merge(config.merge, out_dir / "model", paths, threads=config.threads,
                        out_shard_size=config.out_shard_size, seed=config.seed, overwrite=True,
                        progress=ctx.progress)
        ctx.logger.info("merge %s: %d tensors, %d bytes in %.2f s", ctx.node, res.tensors,
                        res.total_bytes, res.seconds)
        return StageResult(model_dir=out_dir / "model",
                           metrics={"merge_method": res.method, "tensors": res.tensors,
                                    "output_bytes": res.total_bytes, "merge_seconds": round(res.seconds, 3)})
