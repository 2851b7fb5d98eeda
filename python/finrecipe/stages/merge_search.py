"""`type: merge_search`: choose the merge by signals that need no instruction data (and never by a
protected benchmark), and output it as an ordinary model directory.

    stages:
      searched:
        type: merge_search
        base: base
        instruct: instruct
        domains: [finance]                 # one or more domain candidates (stages or checkpoints)
        space:
          methods: [task_arithmetic, ties]
          weights: {instruct: [0.6, 1.4], finance: [0.6, 1.4]}
          density: [0.3, 1.0]              # methods with a density
          layer_groups: 1                  # >1: per-layer-group weights (a mergekit gradient)
          grid_points: 3                   # strategy grid
        strategy: bayesian                 # grid | random | bayesian (optuna TPE)
        trials: 16
        seed: 0
        objective:
          domain: {dataset: finance_dev}   # held out; or {dataset: corpus, holdout: 0.1}
          instruction: {prompts: bundled, limit: 32, max_new_tokens: 48}
          tasks: [{custom: exams/dev.jsonl, kind: multiple_choice}]   # optional dev exams
        select: {rule: constrained, min_agreement: 0.9}                # or rule: weighted, weights: {...}
        dtype: float32                     # merge arithmetic (and out_dtype) as in `type: merge`

Output: `model/` (the selected merge, written by the merge core exactly as a `type: merge` stage
with the selected config would write it), `trials.jsonl`, `trials.csv`, `trials.md`,
`pareto.png`, `selected.yaml` (the mergekit config), `responses.jsonl` (the instruct responses).
Metrics name the selected configuration, its scores, the fixed 1.0/1.0 merge's, and the data the
selection used. See docs/recipes.md ("merge_search").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from finrecipe.errors import ConfigError
from finrecipe.eval.suite import SuiteSpec, parse_task_entries, suite_of_spec
from finrecipe.node import Resolution, ResolveContext
from finrecipe.search.objective import BUNDLED_PROMPTS, DomainObjective, InstructionObjective, SelectRule
from finrecipe.search.space import SearchSpace, grid_size
from finrecipe.stages.base import StageKind, register
from finrecipe.types import DatasetRef, InputKind, InputRef, ModelRef, StageContext, StageResult
from finrecipe.util.fs import write_bytes_atomic, write_text_atomic

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "search" / "prompts.jsonl"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective(_Strict):
    domain: DomainObjective
    instruction: InstructionObjective | None = Field(default_factory=InstructionObjective)
    tasks: list[Annotated[SuiteSpec, SerializeAsAny()]] = Field(default_factory=list)

    @field_validator("tasks", mode="before")
    @classmethod
    def _dispatch(cls, v: Any, info: ValidationInfo) -> Any:
        return parse_task_entries(v) if isinstance(v, list) else v

    @field_validator("tasks", mode="after")
    @classmethod
    def _tasks_not_protected(cls, v: list[SuiteSpec], info: ValidationInfo) -> list[SuiteSpec]:
        protected = _protected(info)
        for i, spec in enumerate(v):
            suite = suite_of_spec(spec)
            for n in [suite.name, *suite.task_names(spec)]:
                hit = n if n in protected else n.split(":", 1)[-1] if n.split(":", 1)[-1] in protected else None
                if hit is not None:
                    raise ValueError(f"tasks[{i}]: {hit!r} is protected (the recipe's `protected:` list: "
                                     f"{', '.join(protected)}): it may be evaluated, never optimised on; "
                                     "select on development data instead")
        return v

    @model_validator(mode="after")
    def _data_not_protected(self, info: ValidationInfo) -> Objective:
        protected = _protected(info)
        if self.domain.dataset in protected:
            raise ValueError(f"domain: dataset {self.domain.dataset!r} is protected (the recipe's `protected:` "
                             "list): it may be evaluated, never optimised on")
        if self.instruction and Path(self.instruction.prompts).stem in protected:
            raise ValueError(f"instruction: prompts {self.instruction.prompts!r} are protected (the recipe's "
                             "`protected:` list): they may be evaluated, never optimised on")
        return self


def _protected(info: ValidationInfo) -> tuple[str, ...]:
    """The recipe's `protected:` suites (the engine passes them in the validation context)."""
    return tuple((info.context or {}).get("protected", ("jfin",)))


class MergeSearchConfig(_Strict):
    base: str
    instruct: str
    domains: list[str] = Field(min_length=1)
    space: SearchSpace = Field(default_factory=SearchSpace)
    strategy: Literal["grid", "random", "bayesian"] = "random"
    trials: int | None = Field(default=None, gt=0, le=10_000)  # default: the grid's size, else 16
    seed: int = 0
    objective: Objective
    select: SelectRule = Field(default_factory=SelectRule)
    dtype: str = "float32"
    out_dtype: str | None = None
    device: str = "auto"
    # not in the cache key: speed only
    batch_tokens: int = Field(default=8192, gt=0)
    threads: int = Field(default=0, ge=0)
    _protected: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> MergeSearchConfig:
        self._protected = _protected(info)
        models = [self.base, self.instruct, *self.domains]
        if len(set(models)) != len(models):
            raise ValueError("base, instruct and domains must be different models")
        for k in self.space.weights:
            if k not in (self.instruct, *self.domains):
                raise ValueError(f"space.weights: {k!r} is neither the instruct model nor a domain model "
                                 f"({', '.join([self.instruct, *self.domains])})")
        from finrecipe.merge.config import DTYPES

        for key in ("dtype", "out_dtype"):
            v = getattr(self, key)
            if v is not None and v not in DTYPES:
                raise ValueError(f"{key}: unsupported dtype {v!r}; use float32, bfloat16 or float16")
        if self.strategy == "grid":
            n = grid_size(self.space, self.instruct, self.domains)
            if self.trials is not None and n > self.trials:
                raise ValueError(f"the grid has {n} candidates, more than trials: {self.trials} (raise trials, "
                                 "lower space.grid_points, or use strategy: random | bayesian)")
        return self

    @property
    def budget(self) -> int:
        if self.trials is not None:
            return self.trials
        if self.strategy == "grid":
            return grid_size(self.space, self.instruct, self.domains)
        return 16


def _prompt_path(config: MergeSearchConfig, recipe_dir: Path) -> Path | None:
    return prompt_path(config.objective.instruction, recipe_dir)


def prompt_path(ins: InstructionObjective | None, recipe_dir: Path) -> Path | None:
    """The prompts file an objective's `instruction:` names (None: no instruction signal)."""
    if ins is None:
        return None
    if ins.prompts == BUNDLED_PROMPTS:
        return PROMPTS_FILE
    p = Path(ins.prompts)
    return p if p.is_absolute() else recipe_dir / p


def read_prompts(path: Path, limit: int | None) -> list[str]:
    from finrecipe.errors import DataError
    from finrecipe.eval.textio import read_jsonl

    rows = read_jsonl(path, None)
    out = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise DataError(f"{path}:{i}: each line needs a non-empty 'prompt'")
        out.append(r["prompt"])
    return out[:limit] if limit else out


@register
class MergeSearch(StageKind[MergeSearchConfig]):
    type = "merge_search"
    version = "1"
    Config = MergeSearchConfig
    provides = "model"

    def inputs(self, config: MergeSearchConfig) -> Sequence[tuple[str, InputKind]]:
        names: list[tuple[str, InputKind]] = [(m, "model") for m in (config.base, config.instruct, *config.domains)]
        names.append((config.objective.domain.dataset, "dataset"))
        for t in config.objective.tasks:
            for inp in suite_of_spec(t).inputs(t):
                if inp not in names:
                    names.append(inp)
        return names

    def cache_config(self, config: MergeSearchConfig) -> Any:
        d = config.model_dump(mode="json")
        for k in ("batch_tokens", "threads"):
            d.pop(k, None)
        return d

    def resolve(self, config: MergeSearchConfig, rc: ResolveContext) -> Resolution:
        """The default key plus the content of the prompt file (and of dev-task files)."""
        res = super().resolve(config, rc)
        files: dict[str, str] = {}
        p = _prompt_path(config, rc.base_dir(("objective", "instruction", "prompts")))
        if p is not None and config.objective.instruction and config.objective.instruction.prompts != BUNDLED_PROMPTS:
            files["prompts"] = rc.shas.sha256(p)[0] if p.is_file() else "missing"
        elif p is not None:
            from finrecipe.util.content import sha256_file

            files["prompts"] = sha256_file(p)
        for i, t in enumerate(config.objective.tasks):
            f = getattr(t, "custom", None)
            if isinstance(f, str):
                q = Path(f)
                q = q if q.is_absolute() else rc.base_dir(("objective", "tasks", i, "custom")) / q
                files[f"tasks[{i}]"] = rc.shas.sha256(q)[0] if q.is_file() else "missing"
        if files:
            from finrecipe.util.content import digest

            res.material["files"] = files
            res.key = digest(res.material)
        return res

    def check(self, config: MergeSearchConfig, inputs: Mapping[str, InputRef], cc: Any = None) -> str | None:
        p = _prompt_path(config, cc.base_dir(("objective", "instruction", "prompts")) if cc else Path.cwd())
        if p is not None and not p.is_file():
            msg = f"prompts file {p} not found"
            if cc is not None:
                raise cc.error(msg, ("objective", "instruction", "prompts"))
            raise ConfigError(msg)
        return None

    def estimate_output_bytes(self, config: MergeSearchConfig, inputs: Mapping[str, InputRef]) -> int | None:
        ref = inputs.get(config.base)
        if not isinstance(ref, ModelRef) or not ref.path.is_dir():
            return None
        from finrecipe.merge import read_model

        return int(read_model(ref.path).total_bytes)

    def run(self, config: MergeSearchConfig, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        return run_merge_search(config, inputs, out_dir, ctx)


def _domain_texts(config: MergeSearchConfig, inputs: Mapping[str, InputRef]) -> tuple[list[str], str]:
    return domain_texts(config.objective.domain, inputs, "merge_search")


def domain_texts(dom: DomainObjective, inputs: Mapping[str, InputRef], who: str) -> tuple[list[str], str]:
    """The held-out documents an objective's `domain:` names, and a description of them."""
    from finrecipe.errors import DataError
    from finrecipe.eval.textio import read_texts
    from finrecipe.search.objective import split_documents

    ds = inputs.get(dom.dataset)
    if not isinstance(ds, DatasetRef):
        raise ConfigError(f"{who}: {dom.dataset!r} is not a dataset")
    texts = read_texts(list(ds.files), ds.format, ds.text_field)
    if dom.holdout is not None:
        _, texts = split_documents(texts, dom.holdout)
        desc = f"the held-out {dom.holdout:g} split of {dom.dataset}"
    else:
        desc = dom.dataset
    if dom.limit:
        texts = texts[:dom.limit]
    if not texts:
        raise DataError(f"{who}: no held-out documents in {dom.dataset!r}")
    return texts, desc


def _task_runners(config: MergeSearchConfig, inputs: Mapping[str, InputRef], out_dir: Path,
                  ctx: StageContext) -> list[tuple[str, Any]]:
    from finrecipe.eval.suite import SuiteContext

    out = []
    for spec in config.objective.tasks:
        suite = suite_of_spec(spec)

        def run(lm: Any, label: str, spec: SuiteSpec = spec, suite: Any = suite) -> list[dict[str, Any]]:
            sctx = SuiteContext(model=f"trial-{label}", out_dir=out_dir / "dev_tasks", recipe_dir=ctx.recipe_dir,
                                cache_dir=ctx.cache_dir, inputs=inputs, logger=ctx.logger)
            return [{"task": r.task, "metric": r.metric, "value": r.value, "higher_is_better": r.higher_is_better,
                     "n": r.n} for r in suite.run(spec, lm, sctx)]

        out.append((suite.name, run))
    return out


def run_merge_search(config: MergeSearchConfig, inputs: Mapping[str, InputRef], out_dir: Path,
                     ctx: StageContext) -> StageResult:
    import json

    import yaml

    from finrecipe.merge import MergeConfig, run_merge
    from finrecipe.search.runner import (
        SearchSetup,
        pareto_png,
        rows,
        run_search,
        sentence,
        table_csv,
        table_markdown,
    )

    paths: dict[str, Path] = {}
    for n in (config.base, config.instruct, *config.domains):
        ref = inputs[n]
        if not isinstance(ref, ModelRef):
            raise ConfigError(f"merge_search: {n!r} is not a model")
        paths[n] = ref.path
    texts, domain_desc = _domain_texts(config, inputs)
    ins = config.objective.instruction
    ppath = _prompt_path(config, ctx.recipe_dir)
    prompts = read_prompts(ppath, ins.limit) if (ins is not None and ppath is not None) else []
    keys = dict((ctx.material or {}).get("inputs") or {})
    setup = SearchSetup(
        base=config.base, instruct=config.instruct, domains=list(config.domains), paths=paths, space=config.space,
        strategy=config.strategy, trials=config.budget, seed=config.seed, domain_texts=texts, prompts=prompts,
        instruction=ins or InstructionObjective(), rule=config.select,
        cache_dir=ctx.cache_dir / "merge_search", model_keys={k: str(v) for k, v in keys.items()},
        tasks=_task_runners(config, inputs, out_dir, ctx),
        task_material=[t.model_dump(mode="json") for t in config.objective.tasks],
        dtype=config.dtype, out_dtype=config.out_dtype,
        device=None if config.device == "auto" else config.device, batch_tokens=config.batch_tokens,
        threads=config.threads)
    res = run_search(setup, progress=ctx.progress, logger=ctx.logger)

    sel = res.selected
    merge_cfg = sel.candidate.merge_config(config.base, dtype=config.dtype, out_dtype=config.out_dtype)
    mc = MergeConfig.from_dict(merge_cfg)
    merged = run_merge(mc, out_dir / "model", paths, threads=config.threads, overwrite=True, progress=ctx.progress)

    rule = config.select
    task_names = sorted({n for t in res.all for n in t.scores.tasks})
    table = rows(res, rule)
    write_text_atomic(out_dir / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in table))
    write_text_atomic(out_dir / "trials.csv", table_csv(res, rule, task_names))
    write_text_atomic(out_dir / "trials.md", table_markdown(res, rule, task_names))
    write_bytes_atomic(out_dir / "pareto.png", pareto_png(res, rule, domain_label=config.objective.domain.dataset))
    write_text_atomic(out_dir / "selected.yaml", yaml.safe_dump(merge_cfg, sort_keys=False))
    write_text_atomic(out_dir / "responses.jsonl", "".join(
        json.dumps({"prompt": r["prompt"], "response": r["response"]}, ensure_ascii=False) + "\n"
        for r in res.responses))
    data_used = {
        "domain": {"dataset": config.objective.domain.dataset, "holdout": config.objective.domain.holdout,
                   "documents": res.data["domain_documents"], "bytes": res.data["domain_bytes"],
                   "what": domain_desc},
        "instruction": None if ins is None else {"prompts": ins.prompts, "count": res.data["prompts"],
                                                 "response_tokens": res.data["response_tokens"]},
        "tasks": task_names,
    }
    protected = list(config._protected)
    text = sentence(res, rule, domain_desc)
    metrics: dict[str, Any] = {
        "schema": "finrecipe.merge_search/1",
        "selected": {"id": sel.id, "config": merge_cfg, "describe": sel.candidate.describe(),
                     **sel.scores.to_json()},
        "fixed": [{"id": f.id, "describe": f.candidate.describe(), **f.scores.to_json()} for f in res.fixed],
        "instruct": res.instruct.scores.to_json(),
        "rule": rule.model_dump(mode="json"),
        "constraint_met": res.constraint_met,
        "selection_data": data_used,
        "protected": protected,
        "strategy": config.strategy, "trials": len(res.trials),
        "trials_reused": sum(1 for t in res.trials if t.reused),
        "trial_path": "memory" if res.memory_path else "memory+core",
        "search_seconds": round(res.seconds, 3), "merge_seconds": round(merged.seconds, 3),
        "summary": text,
    }
    ctx.logger.info("merge_search %s: %s", ctx.node, text)
    return StageResult(model_dir=out_dir / "model", metrics=metrics,
                       artifacts={"trials": "trials.jsonl", "trials_csv": "trials.csv", "trials_table": "trials.md",
                                  "pareto_plot": "pareto.png", "selected_config": "selected.yaml",
                                  "instruct_responses": "responses.jsonl"})


__all__ = ["MergeSearch", "MergeSearchConfig", "Objective", "domain_texts", "prompt_path", "read_prompts",
           "run_merge_search"]
