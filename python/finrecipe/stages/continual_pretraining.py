"""`type: continual_pretraining`: train a causal LM further on domain text (document-masked packing).

Config: finrecipe.train.config.TrainConfig (model, datasets, seq_len, epochs | max_tokens, batch,
optimizer, schedule, validation, checkpoints, launch, device...), `packing`, and `merge_probe`
(score the merge of the live weights with an instruct model every K steps, optionally keep the
best probed checkpoint or stop early; see `MergeProbeConfig` and finrecipe.train.probe). Output:
``out_dir/model`` (HF model dir in the source dtype), ``metrics.jsonl``, ``loss_curve.png``;
resumable from ``out_dir/work``. What both training kinds share is
`finrecipe.stages._training.TrainingStage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finrecipe.node import Resolution, ResolveContext
from finrecipe.search.objective import BUNDLED_PROMPTS, SelectRule
from finrecipe.stages._training import TrainingStage
from finrecipe.stages.base import register
from finrecipe.stages.merge_search import Objective, _protected, prompt_path
from finrecipe.train.config import TrainConfig
from finrecipe.types import DatasetRef, InputKind, InputRef, StageContext

PROBE_KEY = ("merge_probe",)


class MergeProbeConfig(BaseModel):
    """Every ``every_steps`` optimizer steps (and at the last step), form
    ``base + weight·(instruct − base) + (θ_t − base)`` from the live weights θ_t (base: the stage's
    input model) and score it with a merge search's objective (held-out domain bits per byte,
    agreement with the instruct model's own responses) on the main process.

    - ``select``: how probes are ranked (the merge search's rule: ``constrained`` = the lowest
      bits/byte among probes with agreement ≥ ``min_agreement``, else the most agreeable;
      ``weighted``);
    - ``keep``: ``last`` (default): the stage outputs the last weights, as without a probe;
      ``best``: it outputs the best probed checkpoint (the choice is recorded in the metrics);
    - ``stop_when_no_improvement: N``: stop training once N probes in a row have not improved on
      the best one (the learning-rate schedule is the planned one, cut short)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    every_steps: int = Field(ge=1)
    instruct: str
    weight: float = 1.0
    objective: Objective
    select: SelectRule = Field(default_factory=SelectRule)
    keep: Literal["last", "best"] = "last"
    stop_when_no_improvement: int | None = Field(default=None, ge=1)
    # not in the cache key: speed only
    batch_tokens: int = Field(default=8192, gt=0)
    _protected: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _keep_protected(self, info: ValidationInfo) -> MergeProbeConfig:
        self._protected = _protected(info)  # the objective was checked against them; recorded
        return self

    @field_validator("objective", mode="after")
    @classmethod
    def _no_tasks(cls, v: Objective) -> Objective:
        if v.tasks:
            raise ValueError("tasks: development tasks are not supported by merge_probe yet (only domain "
                             "and instruction); use a merge_search stage to select on dev exams")
        return v


class ContinualPretrainingConfig(TrainConfig):
    """TrainConfig, and how documents are packed into sequences:

    - ``documents`` (default): sequences are cut from the stream of documents, but each
      document's segment starts at the EOS that ended the previous one, with position 0, and
      attention does not cross segments (document-masked packing): a document's first token is
      predicted from that EOS alone, never from another document;
    - ``stream``: one causal stream across documents (finrecipe before version 2).

    ``merge_probe`` (optional): see MergeProbeConfig."""

    packing: Literal["documents", "stream"] = "documents"
    merge_probe: MergeProbeConfig | None = None

    @model_validator(mode="after")
    def _probe(self) -> ContinualPretrainingConfig:
        p = self.merge_probe
        if p is None:
            return self
        if p.instruct == self.model:
            raise ValueError("merge_probe.instruct: the instruct model must differ from the trained model "
                             f"{self.model!r} (it is the base of the probed merge)")
        dom = p.objective.domain.dataset
        if dom in self.dataset_weights():
            raise ValueError(f"merge_probe.objective.domain: {dom!r} is trained on by this stage; probe on "
                             "held-out development text that no stage trains on")
        return self


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

    # ------------------------------------------------------------------ merge probe
    def inputs(self, config: ContinualPretrainingConfig) -> Sequence[tuple[str, InputKind]]:
        out = list(super().inputs(config))
        p = config.merge_probe
        if p is not None:
            for inp in ((p.instruct, "model"), (p.objective.domain.dataset, "dataset")):
                if inp not in out:
                    out.append(inp)  # type: ignore[arg-type]
        return out

    def cache_config(self, config: ContinualPretrainingConfig) -> Any:
        d = super().cache_config(config)
        if d.get("merge_probe") is None:
            d.pop("merge_probe", None)  # recipes without a probe keep the keys they had
        else:
            d["merge_probe"].pop("batch_tokens", None)
        return d

    def resolve(self, config: ContinualPretrainingConfig, rc: ResolveContext) -> Resolution:
        """The default key plus, with a probe, the content of its prompts file."""
        res = super().resolve(config, rc)
        p = config.merge_probe
        if p is None or p.objective.instruction is None:
            return res
        path = prompt_path(p.objective.instruction, rc.base_dir(PROBE_KEY + ("objective", "instruction", "prompts")))
        if path is None:
            return res
        if p.objective.instruction.prompts != BUNDLED_PROMPTS:
            sha = rc.shas.sha256(path)[0] if path.is_file() else "missing"
        else:
            from finrecipe.util.content import sha256_file

            sha = sha256_file(path)
        from finrecipe.util.content import digest

        res.material["files"] = {"merge_probe.prompts": sha}
        res.key = digest(res.material)
        return res

    def check(self, config: ContinualPretrainingConfig, inputs: Mapping[str, InputRef], cc: Any = None
              ) -> str | None:
        p = config.merge_probe
        if p is None or p.objective.instruction is None:
            return None
        sub = PROBE_KEY + ("objective", "instruction", "prompts")
        path = prompt_path(p.objective.instruction, cc.base_dir(sub) if cc else Path.cwd())
        if path is not None and not path.is_file():
            msg = f"prompts file {path} not found"
            if cc is not None:
                raise cc.error(msg, sub)
            from finrecipe.errors import ConfigError

            raise ConfigError(msg)
        return None

    def probe_spec(self, config: ContinualPretrainingConfig, inputs: Mapping[str, InputRef],
                   ctx: StageContext) -> dict[str, Any] | None:
        p = config.merge_probe
        if p is None:
            return None
        from finrecipe.errors import ConfigError
        from finrecipe.stages.merge_search import domain_texts, read_prompts
        from finrecipe.types import ModelRef

        base, ins = inputs[config.model], inputs[p.instruct]
        if not isinstance(base, ModelRef) or not isinstance(ins, ModelRef):
            raise ConfigError(f"merge_probe.instruct: {p.instruct!r} is not a model")
        texts, desc = domain_texts(p.objective.domain, inputs, "merge_probe")
        io = p.objective.instruction
        ppath = prompt_path(io, ctx.recipe_dir)
        prompts = read_prompts(ppath, io.limit) if (io is not None and ppath is not None) else []
        return {"base_dir": str(base.path), "instruct_dir": str(ins.path), "instruct": p.instruct,
                "weight": p.weight, "every_steps": p.every_steps, "domain_texts": texts,
                "domain_desc": desc, "domain_dataset": p.objective.domain.dataset,
                "max_length": p.objective.domain.max_length, "prompts": prompts,
                "prompts_name": None if io is None else io.prompts,
                "instruction": None if io is None else io.model_dump(mode="json"),
                "select": p.select.model_dump(mode="json"), "keep": p.keep,
                "stop_when_no_improvement": p.stop_when_no_improvement, "batch_tokens": p.batch_tokens,
                "protected": list(p._protected)}
