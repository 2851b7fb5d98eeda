"""`type: finetune`: instruction tuning with the continual-pretraining trainer.

The data is prompt/response JSONL; the prompt is rendered with `template`, masked out of the loss
(labels -100), and the response plus EOS are the targets. Everything else is TrainConfig.
"""

from __future__ import annotations

from typing import Any

from finrecipe.stages._training import TrainingStage
from finrecipe.stages.base import register
from finrecipe.train.config import TrainConfig
from finrecipe.types import DatasetRef, StageContext


class FinetuneConfig(TrainConfig):
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "### Question:\n{prompt}\n### Answer:\n"
    packing: bool = True


@register
class Finetune(TrainingStage[FinetuneConfig]):
    type = "finetune"
    version = "1"
    Config = FinetuneConfig
    label = "finetune"

    def tokenize(self, config: FinetuneConfig, ref: DatasetRef, tokenizer: Any, weight: float | None,
                 ctx: StageContext) -> Any:
        from finrecipe.train.data import tokenize_instructions

        return tokenize_instructions(ref, tokenizer, ctx.cache_dir, template=config.template,
                                     prompt_field=config.prompt_field,
                                     response_field=config.response_field, seq_len=config.seq_len,
                                     packing=config.packing, progress=ctx.progress, weight=weight)
