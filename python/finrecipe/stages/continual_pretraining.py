"""`type: continual_pretraining`: train a causal LM further on domain text (packed, no masking).

Config: finrecipe.train.config.TrainConfig (model, datasets, seq_len, epochs | max_tokens, batch,
optimizer, schedule, validation, checkpoints, launch, device...). Output: ``out_dir/model`` (HF
model dir in the source dtype), ``metrics.jsonl``, ``loss_curve.png``; resumable from
``out_dir/work``. What both training kinds share is `finrecipe.stages._training.TrainingStage`.
"""

from __future__ import annotations

from typing import Any

from finrecipe.stages._training import TrainingStage
from finrecipe.stages.base import register
from finrecipe.train.config import TrainConfig
from finrecipe.types import DatasetRef, StageContext


class ContinualPretrainingConfig(TrainConfig):
    """All of TrainConfig; nothing stage-specific."""


@register
class ContinualPretraining(TrainingStage[ContinualPretrainingConfig]):
    type = "continual_pretraining"
    version = "1"
    Config = ContinualPretrainingConfig
    label = "continual pretraining"

    def tokenize(self, config: ContinualPretrainingConfig, ref: DatasetRef, tokenizer: Any,
                 weight: float | None, ctx: StageContext) -> Any:
        from finrecipe.train.data import tokenize_pretraining

        return tokenize_pretraining(ref, tokenizer, ctx.cache_dir, ctx.progress, weight)
