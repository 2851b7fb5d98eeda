"""`type: finetune`: instruction tuning with the continual-pretraining trainer.

The data is prompt/response JSONL; the prompt is rendered with `template`, masked out of the loss
(labels -100), and the response plus EOS are the targets. Everything else is TrainConfig.
"""

from __future__ import annotations

from typing import Any

from finrecipe.stages.base import DatasetRef, StageContext, register
from finrecipe.stages.continual_pretraining import Tokenizer, TrainingStage
from finrecipe.train.config import TrainConfig


class FinetuneConfig(TrainConfig):
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "### Question:\n{prompt}\n### Answer:\n"
    packing: bool = True


@register
class Finetune(TrainingStage):
    type = "finetune"
    version = "1"
    Config = FinetuneConfig
    label = "finetune"

    def tokenizer(self, config: Any, ctx: StageContext) -> Tokenizer:
        from finrecipe.train.data import tokenize_instructions

        assert isinstance(config, FinetuneConfig)

        def tokenize(ref: DatasetRef, tok: Any, weight: float | None) -> Any:
            return tokenize_instructions(ref, tok, ctx.cache_dir, template=config.template,
                                         prompt_field=config.prompt_field,
                                         response_field=config.response_field, seq_len=config.seq_len,
                                         packing=config.packing, progress=ctx.progress, weight=weight)

        return tokenize
