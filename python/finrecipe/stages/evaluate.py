"""`type: evaluate`: score recipe models on benchmarks and put the numbers into the run report.

    stages:
      eval:
        type: evaluate
        models: [base, instruct, domain_instruct]   # recipe models or outputs of model stages
        reference: base                             # deltas in the report are against this model
        tasks:
          - suite: jfin                             # japanese-lm-fin-harness
            versions: [default, "0.3"]              # or "all"
            data_dir: ../shared/data/japanese-lm-fin-harness   # or "download" (pinned commit, sha256)
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
``analysis_heatmap_<i>`` (one PNG per vector pair), ``generations_<task>`` (JSONL outputs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finrecipe.errors import ConfigError, DataError
from finrecipe.stages.base import (
    DatasetRef,
    InputKind,
    ModelRef,
    StageContext,
    StageKind,
    StageResult,
    register,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JfinTask(_Strict):
    suite: Literal["jfin"]
    versions: list[str] | Literal["all"] = Field(default_factory=lambda: ["default"])
    tasks: list[str] | None = None
    data_dir: str = "../shared/data/japanese-lm-fin-harness"
    limit: int | None = Field(default=None, gt=0)


class CustomTask(_Strict):
    custom: str
    kind: Literal["multiple_choice", "generation"] = "multiple_choice"
    name: str | None = None
    template: str | None = None
    delimiter: str = " "
    choice_format: str = "{label}. {choice}"
    score: Literal["choice", "label"] = "choice"
    max_new_tokens: int = Field(default=64, gt=0)
    stop: list[str] = Field(default_factory=list)
    chat: bool = False
    limit: int | None = Field(default=None, gt=0)


class PerplexityTask(_Strict):
    perplexity: str | None = None
    files: list[str] | None = None
    name: str | None = None
    max_length: int | None = Field(default=None, gt=1)
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> PerplexityTask:
        if (self.perplexity is None) == (self.files is None):
            raise ValueError("give exactly one of `perplexity: <dataset name>` or `files: [...]`")
        return self


class JudgeSpec(_Strict):
    url: str
    model: str
    api_key_env: str | None = None


class GenerateTask(_Strict):
    generate: str
    name: str | None = None
    max_new_tokens: int = Field(default=256, gt=0)
    judge: JudgeSpec | None = None
    limit: int | None = Field(default=None, gt=0)


class AnalysisSpec(_Strict):
    base: str
    vectors: list[str] = Field(min_length=2)


TaskSpec = JfinTask | CustomTask | PerplexityTask | GenerateTask


class EvaluateConfig(_Strict):
    models: list[str] = Field(min_length=1)
    reference: str | None = None
    tasks: list[TaskSpec] = Field(default_factory=list)
    analysis: AnalysisSpec | None = None
    batch_size: int | None = Field(default=None, gt=0)
    device: str = "auto"
    dtype: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _dispatch(cls, data: Any) -> Any:
        """Pick each task's model by its distinguishing key (clear errors instead of union noise)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), list):
            return data
        out = []
        for i, t in enumerate(data["tasks"]):
            if isinstance(t, BaseModel) or not isinstance(t, Mapping):
                out.append(t)
                continue
            kinds = [k for k in ("suite", "custom", "perplexity", "files", "generate") if k in t]
            if not kinds:
                raise ValueError(f"tasks[{i}]: say what to run with one of `suite: jfin`, `custom: FILE`, "
                                 "`perplexity: DATASET` (or `files: [...]`), `generate: FILE`")
            by_key: dict[str, type[BaseModel]] = {"suite": JfinTask, "custom": CustomTask,
                                                  "perplexity": PerplexityTask, "files": PerplexityTask,
                                                  "generate": GenerateTask}
            model = by_key[kinds[0]]
            out.append(model.model_validate(t))
        return {**data, "tasks": out}

    @model_validator(mode="after")
    def _refs(self) -> EvaluateConfig:
        if self.reference is not None and self.reference not in self.models:
            raise ValueError(f"reference {self.reference!r} must be one of models: {', '.join(self.models)}")
        return self


def _task_name(t: Any) -> str:
    if isinstance(t, CustomTask):
        return "custom:" + (t.name or Path(t.custom).stem)
    if isinstance(t, PerplexityTask):
        return "ppl:" + (t.name or t.perplexity or Path((t.files or ["files"])[0]).stem)
    if isinstance(t, GenerateTask):
        return "gen:" + (t.name or Path(t.generate).stem)
    return "jfin"


@register
class EvaluateStage(StageKind):
    type = "evaluate"
    version = "1"
    Config = EvaluateConfig
    produces_model = False

    def cache_config(self, config: BaseModel) -> Any:
        # The batch size changes speed, not scores (the scorer is batch-size independent; tested),
        # so changing it does not rerun an evaluation.
        d = config.model_dump(mode="json")
        d.pop("batch_size", None)
        return d

    def inputs(self, config: BaseModel) -> Sequence[tuple[str, InputKind]]:
        assert isinstance(config, EvaluateConfig)
        names: list[tuple[str, InputKind]] = [(m, "model") for m in config.models]
        if config.analysis:
            for m in [config.analysis.base, *config.analysis.vectors]:
                if (m, "model") not in names:
                    names.append((m, "model"))
        for t in config.tasks:
            if isinstance(t, PerplexityTask) and t.perplexity:
                names.append((t.perplexity, "dataset"))
        return names

    def run(self, config: BaseModel, inputs: Mapping[str, ModelRef | DatasetRef],
            out_dir: Path, ctx: StageContext) -> StageResult:
        assert isinstance(config, EvaluateConfig)
        return run_evaluation(config, inputs, Path(out_dir), ctx)


def _resolve(p: str, ctx: StageContext) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (ctx.recipe_dir / q)


def _model(inputs: Mapping[str, ModelRef | DatasetRef], name: str) -> ModelRef:
    ref = inputs.get(name)
    if not isinstance(ref, ModelRef):
        raise ConfigError(f"evaluate: {name!r} is not a model of this recipe")
    return ref


def run_evaluation(config: EvaluateConfig, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
                   ctx: StageContext) -> StageResult:
    import gc

    from finrecipe.eval.api import make_scorer, parse_versions
    from finrecipe.eval.runner import evaluate_jfin, jfin_summary
    from finrecipe.eval.tasks import jfin

    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, str] = {}
    models_out: dict[str, Any] = {}
    task_order: list[str] = []
    detail: dict[str, Any] = {}
    for t in config.tasks:
        if isinstance(t, JfinTask):
            for name in (t.tasks or list(jfin.TASKS)):
                if name not in task_order:
                    task_order.append(name)
        else:
            task_order.append(_task_name(t))
    for mname in config.models:
        ref = _model(inputs, mname)
        ctx.logger.info("evaluate: %s (%s)", mname, ref.path)
        scorer = make_scorer(ref.path, device=config.device, dtype=config.dtype, batch_size=config.batch_size)
        tasks: dict[str, Any] = {}
        entry: dict[str, Any] = {"average": None, "average_complete": False, "best_version": None,
                                 "tasks": tasks, "jfin_versions": {}}
        detail[mname] = {}
        for t in config.tasks:
            if isinstance(t, JfinTask):
                versions = parse_versions(t.versions)
                data_dir = (jfin.download_data(ctx.cache_dir) if t.data_dir == "download"
                            else _resolve(t.data_dir, ctx))
                res = evaluate_jfin(scorer, data_dir, versions=versions, tasks=t.tasks,
                                    limit=t.limit, progress=ctx.progress)
                s = jfin_summary(res)
                entry.update(average=s["average"], average_complete=s["complete"], best_version=s["best_version"])
                entry["jfin_versions"] = {v: {k: r.get("value") for k, r in by.items()} for v, by in res.items()}
                for k, r in s["tasks"].items():
                    tasks[k] = _public(r, True)
                detail[mname]["jfin"] = res
            elif isinstance(t, CustomTask):
                from finrecipe.eval.tasks import custom

                path = _resolve(t.custom, ctx)
                name = _task_name(t)
                if t.kind == "multiple_choice":
                    r = custom.evaluate_multiple_choice(scorer, path, template=t.template, delimiter=t.delimiter,
                                                        choice_format=t.choice_format, score=t.score,
                                                        limit=t.limit, progress=ctx.progress)
                else:
                    gen_path = out_dir / "generations" / f"{mname}.{name.replace(':', '-')}.jsonl"
                    r = custom.evaluate_generation(scorer.model, scorer.tokenizer, path, template=t.template,
                                                   max_new_tokens=t.max_new_tokens, stop=t.stop, chat=t.chat,
                                                   limit=t.limit, out_file=gen_path, progress=ctx.progress)
                    artifacts[f"generations_{mname}_{name}"] = str(gen_path)
                tasks[name] = _public(r, True)
            elif isinstance(t, PerplexityTask):
                from finrecipe.eval.perplexity import bits_per_byte

                name = _task_name(t)
                if t.perplexity:
                    ds = inputs.get(t.perplexity)
                    if not isinstance(ds, DatasetRef):
                        raise ConfigError(f"evaluate: {t.perplexity!r} is not a dataset of this recipe")
                    files, fmt, field = list(ds.files), ds.format, ds.text_field
                else:
                    files, fmt, field = [_resolve(f, ctx) for f in (t.files or [])], None, "text"
                r = bits_per_byte(scorer.model, scorer.tokenizer, files, fmt=fmt, text_field=field,
                                  max_length=t.max_length, limit=t.limit, progress=ctx.progress)
                tasks[name] = _public(r, False)
            elif isinstance(t, GenerateTask):
                from finrecipe.eval.generate import run_generation

                name = _task_name(t)
                gen_path = out_dir / "generations" / f"{mname}.{name.replace(':', '-')}.jsonl"
                r = run_generation(scorer.model, scorer.tokenizer, _resolve(t.generate, ctx), out_file=gen_path,
                                   max_new_tokens=t.max_new_tokens,
                                   judge=t.judge.model_dump() if t.judge else None, limit=t.limit,
                                   progress=ctx.progress)
                artifacts[f"generations_{mname}_{name}"] = str(gen_path)
                tasks[name] = _public(r, True)
        models_out[mname] = entry
        del scorer
        gc.collect()
    metrics: dict[str, Any] = {"schema": "finrecipe.evaluate/1", "reference": config.reference,
                               "task_order": task_order, "models": models_out,
                               "deltas": _deltas(models_out, config.reference), "analysis": None}
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
    _write_atomic(out_dir / "results.json", json.dumps({"metrics": metrics, "detail": detail}, indent=1,
                                                       ensure_ascii=False, default=str).encode("utf-8"))
    artifacts["results"] = str(out_dir / "results.json")
    try:
        from finrecipe.report.plots import scores_bar_png

        png = scores_bar_png(metrics)
        if png:
            _write_atomic(out_dir / "scores.png", png)
            artifacts["scores_plot"] = str(out_dir / "scores.png")
    except ImportError:  # report package not importable: the report will draw its own
        pass
    return StageResult(metrics=metrics, artifacts=artifacts)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _public(r: Mapping[str, Any], higher: bool) -> dict[str, Any]:
    if "missing" in r:
        return {"missing": r["missing"]}
    keep = {k: r.get(k) for k in ("metric", "value", "stderr", "n", "version")}
    keep["higher_is_better"] = r.get("higher_is_better", higher)
    if "metrics" in r:
        keep["metrics"] = r["metrics"]
    return keep


def _deltas(models: Mapping[str, Any], reference: str | None) -> dict[str, Any]:
    if reference is None or reference not in models:
        return {}
    ref = models[reference]
    out: dict[str, Any] = {}
    for m, e in models.items():
        d: dict[str, Any] = {}
        for k, r in e["tasks"].items():
            rr = ref["tasks"].get(k)
            if r.get("value") is not None and rr is not None and rr.get("value") is not None:
                d[k] = r["value"] - rr["value"]
        if e["average"] is not None and ref["average"] is not None:
            d["average"] = e["average"] - ref["average"]
        out[m] = d
    return out


__all__ = ["EvaluateConfig", "EvaluateStage", "run_evaluation", "DataError"]
