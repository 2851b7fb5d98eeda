"""`type: finetune`: supervised fine-tuning on prompt/response JSONL with the same trainer.

Each example is ``template`` with ``{prompt}`` replaced, then the response and EOS; only the
response and EOS are targets (prompt labels are -100). Examples are packed into ``seq_len`` rows
(``packing: true``) or one per row, truncated and padded (``packing: false``).
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


class FinetuneConfig(TrainConfig):
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "### Question:\n{prompt}\n### Answer:\n"
    packing: bool = True


@register
class Finetune(StageKind):
    type = "finetune"
    version = "1"
    Config = FinetuneConfig

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
        from finrecipe.train.data import tokenize_instructions
        from finrecipe.train.runner import run_training

        assert isinstance(config, FinetuneConfig)

        def tokenize(ref: DatasetRef, tok: Any, weight: float | None) -> Any:
            return tokenize_instructions(ref, tok, ctx.cache_dir, template=config.template,
                                         prompt_field=config.prompt_field,
                                         response_field=config.response_field, seq_len=config.seq_len,
                                         packing=config.packing, progress=ctx.progress, weight=weight)

        return run_training(config, inputs, out_dir, ctx, tokenize, f"{ctx.node}: finetune")
