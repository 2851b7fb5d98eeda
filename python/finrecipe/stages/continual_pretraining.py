"""`type: continual_pretraining`: train a causal LM further on domain text (packed, no masking).

Config: finrecipe.train.config.TrainConfig (model, datasets, seq_len, epochs | max_tokens, batch,
optimizer, schedule, validation, checkpoints, launch, device...). Output: ``out_dir/model`` (HF
model dir in the source dtype), ``metrics.jsonl``, ``loss_curve.png``; resumable from
``out_dir/work``.

`TrainingStage` is the part both training kinds share (this one and `finetune`): inputs, size
estimate, cache key and the run; a kind only says how its datasets are tokenized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

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

# Settings that change how often things are logged or saved, never the trained weights: they stay
# out of the cache key, so changing them does not retrain.
_NOT_IN_KEY = ("log_every", "checkpoint_every_steps", "keep_checkpoints")

Tokenizer = Callable[[DatasetRef, Any, "float | None"], Any]


class TrainingStage(StageKind):
    """Shared by the training stage kinds; subclasses implement `tokenizer(config, ctx)`."""

    label: ClassVar[str]

    def inputs(self, config: BaseModel) -> Sequence[tuple[str, InputKind]]:
        from finrecipe.train.runner import training_inputs

        assert isinstance(config, TrainConfig)
        return training_inputs(config)  # type: ignore[return-value]

    def cache_config(self, config: BaseModel) -> Any:
        d = config.model_dump(mode="json")
        for k in _NOT_IN_KEY:
            d.pop(k, None)
        return d

    def estimate_output_bytes(self, config: BaseModel,
                              inputs: Mapping[str, ModelRef | DatasetRef]) -> int | None:
        from finrecipe.train.runner import estimate_model_bytes

        assert isinstance(config, TrainConfig)
        return estimate_model_bytes(config, inputs)

    def tokenizer(self, config: Any, ctx: StageContext) -> Tokenizer:
        raise NotImplementedError

    def run(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe.train.runner import run_training

        assert isinstance(config, TrainConfig)
        return run_training(config, inputs, out_dir, ctx, self.tokenizer(config, ctx),
                            f"{ctx.node}: {self.label}")


class ContinualPretrainingConfig(TrainConfig):
    """All of TrainConfig; nothing stage-specific."""


@register
class ContinualPretraining(TrainingStage):
    type = "continual_pretraining"
    version = "1"
    Config = ContinualPretrainingConfig
    label = "continual pretraining"

    def tokenizer(self, config: Any, ctx: StageContext) -> Tokenizer:
        from finrecipe.train.data import tokenize_pretraining

        def tokenize(ref: DatasetRef, tok: Any, weight: float | None) -> Any:
            return tokenize_pretraining(ref, tok, ctx.cache_dir, ctx.progress, weight)

        return tokenize
