"""`type: continual_pretraining`: train a causal LM further on domain text (packed, no masking).

Config: finrecipe.train.config.TrainConfig (model, datasets, seq_len, epochs | max_tokens, batch,
optimizer, schedule, validation, checkpoints, launch, device...). Output: ``out_dir/model`` (HF
model dir in the source dtype), ``metrics.jsonl``, ``loss_curve.png``; resumable from
``out_dir/work``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finrecipe.stages.base import (
    DatasetRef,
    InputKind,
    ModelRef,
    StageContext,
    StageKind,
    StageResult,
    register,
)
from finrecipe.train.config import TrainConfig


class ContinualPretrainingConfig(TrainConfig):
    """All of TrainConfig; nothing stage-specific."""


@register
class ContinualPretraining(StageKind):
    type = "continual_pretraining"
    version = "1"
    Config = ContinualPretrainingConfig

    def inputs(self, config: BaseModel) -> Sequence[tuple[str, InputKind]]:
        from finrecipe.train.runner import training_inputs

        assert isinstance(config, TrainConfig)
        return training_inputs(config)  # type: ignore[return-value]

    def estimate_output_bytes(self, config: BaseModel,
                              inputs: Mapping[str, ModelRef | DatasetRef]) -> int | None:
        from finrecipe.train.runner import estimate_model_bytes

        assert isinstance(config, TrainConfig)
        return estimate_model_bytes(config, inputs)

    def run(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe.train.data import tokenize_pretraining
        from finrecipe.train.runner import run_training

        assert isinstance(config, ContinualPretrainingConfig)

        def tokenize(ref: DatasetRef, tok: Any, weight: float | None) -> Any:
            return tokenize_pretraining(ref, tok, ctx.cache_dir, ctx.progress, weight)

        return run_training(config, inputs, out_dir, ctx, tokenize, f"{ctx.node}: continual pretraining")
