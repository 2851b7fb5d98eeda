"""`type: continual_pretraining`: train a causal LM further on domain text (document-masked packing).

Config: finrecipe.train.config.TrainConfig (model, datasets, seq_len, epochs | max_tokens, batch,
optimizer, schedule, validation, checkpoints, launch, device...). Output: ``out_dir/model`` (HF
model dir in the source dtype), ``metrics.jsonl``, ``loss_curve.png``; resumable from
``out_dir/work``. What both training kinds share is `finrecipe.stages._training.TrainingStage`.
"""

from __future__ import annotations

from typing import Any, Literal

from finrecipe.stages._training import TrainingStage
from finrecipe.stages.base import register
from finrecipe.train.config import TrainConfig
from finrecipe.types import DatasetRef, StageContext


class ContinualPretrainingConfig(TrainConfig):
    """TrainConfig, and how documents are packed into sequences:

    - ``documents`` (default): sequences are cut from the stream of documents, but each
      document's segment starts at the EOS that ended the previous one, with position 0, and
      attention does not cross segments (document-masked packing): a document's first token is
      predicted from that EOS alone, never from another document;
    - ``stream``: one causal stream across documents (finrecipe before version 2)."""

    packing: Literal["documents", "stream"] = "documents"


@register
class ContinualPretraining(TrainingStage[ContinualPretrainingConfig]):
    type = "continual_pretraining"
    version = "2"  # 2: document-masked packing by default, validation held out by document
    Config = ContinualPretrainingConfig
    label = "continual pretraining"

    def packing(self, config: ContinualPretrainingConfig) -> Literal["documents", "stream"]:
        return config.packing

    def tokenize(self, config: ContinualPretrainingConfig, ref: DatasetRef, tokenizer: Any,
                 weight: float | None, ctx: StageContext) -> Any:
        from finrecipe.train.data import tokenize_pretraining

        return tokenize_pretraining(ref, tokenizer, ctx.cache_dir, ctx.progress, weight)
