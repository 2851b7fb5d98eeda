"""`type: evaluate`: score recipe models on benchmarks and put the numbers into the run report.

    stages:
      eval:
        type: evaluate
        models: [base, instruct, domain_instruct]   # recipe models or outputs of model stages
        reference: base                             # deltas in the report are against this model
        tasks:
          - suite: jfin                             # japanese-lm-fin-harness
            versions: [default, "0.3"]              # or "all"
            data_dir: path/to/japanese-lm-fin-harness   # required; or "download" (pinned commit, sha256)
            limit: null
          - custom: exams/internal.jsonl            # multiple choice: question, choices, answer[, context]
            kind: multiple_choice
            template: "問題: {question}\\n{choices}\\n答え:"
          - custom: qa.jsonl                        # generation: prompt, answer(s); greedy exact match
            kind: generation
            template: "{prompt}"
            max_new_tokens: 32
            stop: ["\\n"]
          - perplexity: fin_heldout                 # a recipe dataset (or `files: [...]`): bits per byte
          - generate: prompts.jsonl                 # chat template, greedy; optional judge
            judge: {url: http://127.0.0.1:8000/v1, model: judge-model}
        analysis: {base: base, vectors: [instruct, domain_cpt]}
        batch_size: null
        device: auto
        dtype: auto

Result metrics (``StageResult.metrics``), schema ``finrecipe.evaluate/1``::

    {"schema": "finrecipe.evaluate/1",
     "reference": "base" | null,
     "task_order": ["chabsa", ..., "custom:internal", "ppl:fin_heldout", "gen:prompts"],
     "models": {model: {
         "average": 41.2 | null,           # jfin leaderboard average (100 × metric, best version)
         "average_complete": true,         # false when a jfin task's data was missing
         "best_version": "default",
         "tasks": {task: {"metric": "acc", "value": 0.31, "stderr": 0.02, "n": 475,
                          "higher_is_better": true, "version": "default"}
                         | {"missing": "why"}},
         "jfin_versions": {version: {task: value | null}}}},
     "deltas": {model: {task: value − reference value, "average": ...}},
     "analysis": {... finrecipe.analysis JSON ...} | null}

Artifacts: ``results`` (results.json, full detail), ``scores_plot`` (bar chart PNG),
``analysis_heatmap_<i>`` (one PNG per vector pair), ``generations_<model>_<task>`` (JSONL outputs).

Each task entry is run by an evaluation suite (`finrecipe.eval.suite`: one registry, one module per
suite); the entry's key selects it. Models are scored by the loop shared with `finrecipe eval`
(`finrecipe.eval.loop`); results are typed (`finrecipe.eval.results`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from finrecipe.errors import ConfigError
from finrecipe.eval.suite import SuiteSpec, parse_task_entries, suite_of_spec
from finrecipe.stages.base import CheckContext, StageKind, register
from finrecipe.types import DatasetRef, InputKind, ModelRef, Request, StageContext, StageResult
from finrecipe.util.fs import write_bytes_atomic, write_text_atomic


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnalysisSpec(_Strict):
    base: str
    vectors: list[str] = Field(min_length=2)


class EvaluateConfig(_Strict):
    models: list[str] = Field(min_length=1)
    reference: str | None = None
    tasks: list[Annotated[SuiteSpec, SerializeAsAny()]] = Field(default_factory=list)
    analysis: AnalysisSpec | None = None
    batch_size: int | None = Field(default=None, gt=0)
    device: str = "auto"
    dtype: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _dispatch(cls, data: Any) -> Any:
        """Pick each task entry's suite by its distinguishing key (clear errors instead of union noise)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), list):
            return data
        return {**data, "tasks": parse_task_entries(data["tasks"])}

    @model_validator(mode="after")
    def _refs(self) -> EvaluateConfig:
        if self.reference is not None and self.reference not in self.models:
            raise ValueError(f"reference {self.reference!r} must be one of models: {', '.join(self.models)}")
        return self


@register
class EvaluateStage(StageKind[EvaluateConfig]):
    type = "evaluate"
    version = "1"
    Config = EvaluateConfig
    provides = "none"

    def cache_config(self, config: EvaluateConfig) -> Any:
        # The batch size changes speed, not scores (the scorer is batch-size independent; tested),
        # so changing it does not rerun an evaluation. A suite whose version is past "1" puts its
        # version into its entry (so bumping it reruns exactly the evaluations that use it).
        d = config.model_dump(mode="json")
        d.pop("batch_size", None)
        for spec, entry in zip(config.tasks, d["tasks"], strict=True):
            v = suite_of_spec(spec).version
            if v != "1":
                entry["suite_version"] = v
        return d

    def inputs(self, config: EvaluateConfig) -> Sequence[tuple[str, InputKind]]:
        names: list[tuple[str, InputKind]] = [(m, "model") for m in config.models]
        if config.analysis:
            for m in [config.analysis.base, *config.analysis.vectors]:
                if (m, "model") not in names:
                    names.append((m, "model"))
        for t in config.tasks:
            for inp in suite_of_spec(t).inputs(t):
                names.append(inp)
        return names

    def requests(self, config: EvaluateConfig, cc: CheckContext) -> list[Request]:
        """Each entry's: files outside the recipe's directories, a judge's host."""
        out: list[Request] = []
        for i, t in enumerate(config.tasks):
            out += [r for r in suite_of_spec(t).requests(t, cc, ("tasks", i)) if r not in out]
        return out

    def run(self, config: EvaluateConfig, inputs: Mapping[str, ModelRef | DatasetRef],
            out_dir: Path, ctx: StageContext) -> StageResult:
        return run_evaluation(config, inputs, Path(out_dir), ctx)


def _model(inputs: Mapping[str, ModelRef | DatasetRef], name: str) -> ModelRef:
    ref = inputs.get(name)
    if not isinstance(ref, ModelRef):
        raise ConfigError(f"evaluate: {name!r} is not a model of this recipe")
    return ref


def run_evaluation(config: EvaluateConfig, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
                   ctx: StageContext) -> StageResult:
    from finrecipe.eval.loop import evaluate_models

    out_dir.mkdir(parents=True, exist_ok=True)
    run = evaluate_models([_model(inputs, m) for m in config.models], config.tasks, out_dir=out_dir,
                          device=config.device, dtype=config.dtype, batch_size=config.batch_size,
                          recipe_dir=ctx.recipe_dir, cache_dir=ctx.cache_dir, inputs=inputs,
                          progress=ctx.progress, logger=ctx.logger, grants=ctx.grants)
    artifacts = run.artifacts
    metrics = run.metrics(config.reference).to_json()
    if config.analysis:
        from finrecipe.analysis import analyze

        base = _model(inputs, config.analysis.base)
        vecs = [_model(inputs, v) for v in config.analysis.vectors]
        an = analyze(base.path, [v.path for v in vecs], out_dir=out_dir / "analysis",
                     names=[config.analysis.base, *config.analysis.vectors], progress=ctx.progress)
        metrics["analysis"] = {k: v for k, v in an.items() if k != "tensors"}
        for i, p in enumerate(an.get("heatmaps", [])):
            artifacts[f"analysis_heatmap_{i}"] = p
        artifacts["analysis_json"] = str(out_dir / "analysis" / "analysis.json")
    write_text_atomic(out_dir / "results.json", json.dumps({"metrics": metrics, "detail": run.detail}, indent=1,
                                                           ensure_ascii=False, default=str))
    artifacts["results"] = str(out_dir / "results.json")
    from finrecipe.report.plots import scores_bar_png

    png = scores_bar_png(metrics)
    if png:
        write_bytes_atomic(out_dir / "scores.png", png)
        artifacts["scores_plot"] = str(out_dir / "scores.png")
    return StageResult(metrics=metrics, artifacts=artifacts)


__all__ = ["AnalysisSpec", "EvaluateConfig", "EvaluateStage", "run_evaluation"]
