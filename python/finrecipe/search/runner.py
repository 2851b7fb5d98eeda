"""Running a merge search: load one model, prepare the development data once, try the candidates
(each merged into the loaded model's weights, see `fastmerge`), cache every trial by content, select.

    res = run_search(SearchSetup(...), progress=..., logger=...)
    res.selected, res.trials, res.fixed, res.instruct

Trial cache: ``<trial_dir>/<candidate key>.json`` where `trial_dir` is keyed by everything a
trial's scores depend on besides the candidate (the input models' keys, the development data, the
responses, the tasks, the merge dtype and seed). A finished trial is never run again; a killed
search resumes with the trials it had finished; a larger budget reuses the smaller one's trials.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.progress import NullProgress, Progress
from finrecipe.search.objective import (
    DevData,
    InstructionObjective,
    Scores,
    SelectRule,
    feasible,
    generate_responses,
    response_items,
    rolling_items,
    score_model,
    select,
    utility,
)
from finrecipe.search.space import Candidate, SearchSpace, fixed_candidate
from finrecipe.search.strategy import Strategy, run_strategy
from finrecipe.util.content import digest, read_json
from finrecipe.util.fs import write_json_atomic

CACHE_VERSION = "1"
# A dev task: (name, run(lm) -> list of {"task", "value", "higher_is_better", "metric"})
TaskRunner = Callable[[Any, str], list[dict[str, Any]]]


@dataclass
class SearchSetup:
    """Everything a search needs, as plain values (the stage builds it from its config)."""

    base: str
    instruct: str
    domains: list[str]
    paths: dict[str, Path]  # model name → directory
    space: SearchSpace
    strategy: Strategy
    trials: int
    seed: int
    domain_texts: list[str]
    prompts: list[str]
    instruction: InstructionObjective
    rule: SelectRule
    cache_dir: Path  # trial cache and the instruct responses live below it
    model_keys: dict[str, str] = field(default_factory=dict)  # content keys of the input models
    tasks: list[tuple[str, TaskRunner]] = field(default_factory=list)
    task_material: Any = None  # what the tasks' scores depend on (their specs)
    dtype: str = "float32"  # merge arithmetic dtype (mergekit `dtype`)
    out_dtype: str | None = None
    device: str | None = None
    max_length: int | None = None
    batch_tokens: int = 8192
    keep_in_memory: bool | None = None  # None: when base + task vectors fit in `memory_budget`
    memory_budget: int = 8 << 30
    threads: int = 0
    merge_seed: int = 0
    # the instruct responses, when the caller has them already (as `generate_responses` returns them)
    responses: list[dict[str, Any]] | None = None


@dataclass
class Trial:
    id: str
    candidate: Candidate
    scores: Scores
    seconds: float
    path: str  # "memory" | "core" | "model" (an input model as it is)
    reused: bool = False
    role: str = "search"  # "search" | "fixed" | "instruct"

    def row(self, rule: SelectRule) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "role": self.role, "candidate": self.candidate.to_json(),
                             "describe": self.candidate.describe(), **self.scores.to_json(),
                             "utility": utility(self.scores, rule), "feasible": feasible(self.scores, rule),
                             "seconds": round(self.seconds, 4), "path": self.path, "reused": self.reused}
        return d


@dataclass
class SearchResult:
    trials: list[Trial]  # search trials in order (duplicates of a candidate appear once)
    fixed: list[Trial]  # the 1.0/1.0 task-arithmetic merge per domain model
    instruct: Trial
    selected: Trial
    constraint_met: bool
    data: dict[str, Any]
    seconds: float
    memory_path: bool
    responses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all(self) -> list[Trial]:
        """The instruct model, the fixed merges, then the search trials (a search candidate equal to
        a fixed merge is listed once, as the fixed merge)."""
        fixed = {t.id for t in self.fixed}
        return [self.instruct, *self.fixed, *[t for t in self.trials if t.id not in fixed]]


def _dtype_of_device(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def prepare(setup: SearchSetup, model: Any, tokenizer: Any, merger: Any, logger: logging.Logger
            ) -> tuple[DevData, str]:
    """Tokenized domain windows, the instruct responses (cached by content) and the instruct model's
    own scores; returns the data and its content key."""
    from finrecipe.eval.scoring import model_max_length

    max_len = min(setup.max_length or 10**9, model_max_length(model, tokenizer))
    items = rolling_items(tokenizer, setup.domain_texts, max_len)
    nbytes = sum(len(t.encode("utf-8")) for t in setup.domain_texts)
    data = DevData(domain_items=items, domain_bytes=nbytes, domain_docs=len(setup.domain_texts))
    if setup.prompts:
        ins = setup.instruction
        rkey = digest({"v": CACHE_VERSION, "instruct": setup.model_keys.get(setup.instruct,
                                                                             str(setup.paths[setup.instruct])),
                       "prompts": list(setup.prompts), "max_new_tokens": ins.max_new_tokens, "chat": ins.chat,
                       "device": str(next(model.parameters()).device.type)})
        rfile = setup.cache_dir / "responses" / f"{rkey[:32]}.json"
        cached = read_json(rfile)
        if setup.responses is not None:
            responses = setup.responses
        elif isinstance(cached, dict) and cached.get("key") == rkey:
            responses = cached["responses"]
        else:
            merger.restore(setup.instruct)
            logger.info("merge_search: generating the instruct model's responses to %d prompts", len(setup.prompts))
            responses = generate_responses(model, tokenizer, setup.prompts, max_new_tokens=ins.max_new_tokens,
                                           chat=ins.chat)
            write_json_atomic(rfile, {"key": rkey, "responses": responses})
        data.responses = responses
        data.response_items = response_items(responses, max_len)
    key = digest({"v": CACHE_VERSION, "domain": digest(list(setup.domain_texts)), "max_len": max_len,
                  "responses": digest([r["response_ids"] for r in data.responses]),
                  "prompt_ids": digest([r["prompt_ids"] for r in data.responses])})
    return data, key


def run_search(setup: SearchSetup, *, progress: Progress | None = None,
               logger: logging.Logger | None = None) -> SearchResult:
    from finrecipe.eval.model import load_model, pick_device
    from finrecipe.search.fastmerge import InMemoryMerger, Prefetch, fp32_bytes

    progress = progress or NullProgress()
    logger = logger or logging.getLogger("finrecipe")
    t0 = time.monotonic()
    device = pick_device(setup.device)
    names = [setup.base, setup.instruct, *setup.domains]
    paths = {n: setup.paths[n] for n in names}
    cpu = device == "cpu"
    ties = "ties" in setup.space.methods
    keep = setup.keep_in_memory
    if keep is None:
        keep = fp32_bytes(paths, setup.base, sorted_keys=ties and cpu) <= setup.memory_budget
    # The task vectors (and TIES's sorted keys) are read on a second thread while the model loads
    # and the instruct model is scored.
    pre = Prefetch(paths, setup.base, [setup.instruct, *setup.domains], sort=ties) if keep and cpu else None
    model, tokenizer = load_model(setup.paths[setup.instruct], device=device, dtype=_dtype_of_device(device))
    merger = InMemoryMerger(model, paths, setup.base, keep_in_memory=keep, threads=setup.threads, prefetch=pre)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    data, data_key = prepare(setup, model, tokenizer, merger, logger)
    scope = digest({"v": CACHE_VERSION, "models": {n: setup.model_keys.get(n, str(paths[n])) for n in names},
                    "base": setup.base, "instruct": setup.instruct, "data": data_key,
                    "tasks": setup.task_material, "dtype": setup.dtype, "out_dtype": setup.out_dtype,
                    "merge_seed": setup.merge_seed, "device": device.split(":")[0],
                    "model_dtype": _dtype_of_device(device)})
    trial_dir = setup.cache_dir / "trials" / scope[:32]

    def run_tasks(label: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if not setup.tasks:
            return out
        from finrecipe.eval.lm import HFLM

        lm = HFLM(model, tokenizer)
        for _name, runner in setup.tasks:
            for r in runner(lm, label):
                out[str(r["task"])] = r
        return out

    def measure(label: str) -> Scores:
        s = score_model(model, data, pad_id=int(pad), batch_tokens=setup.batch_tokens)
        s.tasks = run_tasks(label)
        return s

    # The instruct model itself: the reference of agreement (1.0 by definition).
    t1 = time.monotonic()
    merger.restore(setup.instruct)
    inst = measure("instruct")
    data.instruct_logprob = inst.response_logprob
    if inst.response_logprob is not None:
        inst.agreement = 1.0
    instruct_trial = Trial("instruct", Candidate("none", setup.domains[0], {setup.instruct: 1.0}, None, "instruct"),
                           inst, time.monotonic() - t1, "model", role="instruct")

    seen: dict[str, Trial] = {}
    order: list[str] = []
    memory_path = True

    def evaluate(c: Candidate, role: str = "search") -> Trial:
        nonlocal memory_path
        key = c.key
        if key in seen:
            return seen[key]
        f = trial_dir / f"{key}.json"
        rec = read_json(f)
        if isinstance(rec, dict) and rec.get("candidate") == c.to_json():
            tr = Trial(key, c, Scores.from_json(rec["scores"]), float(rec["seconds"]), str(rec["path"]),
                       reused=True, role=role)
        else:
            ts = time.monotonic()
            cfg = c.merge_config(setup.base, dtype=setup.dtype, out_dtype=setup.out_dtype)
            how = merger.apply(cfg, seed=setup.merge_seed)
            s = measure(key)
            tr = Trial(key, c, s, time.monotonic() - ts, how, role=role)
            write_json_atomic(f, {"candidate": c.to_json(), "scores": s.to_json(), "seconds": tr.seconds,
                                  "path": how})
        if tr.path == "core":
            memory_path = False
        seen[key] = tr
        if role == "search":
            order.append(key)
        return tr

    fixed = [evaluate(fixed_candidate(setup.instruct, d), role="fixed") for d in setup.domains]
    with progress.task(f"merge search ({setup.strategy})", total=setup.trials) as task:
        def tell(c: Candidate) -> tuple[float, float]:
            tr = evaluate(c)
            if tr.id not in order:  # a candidate equal to a fixed merge still counts as a search trial
                order.append(tr.id)
            task.update(advance=1, info=f"{tr.candidate.describe()}: {tr.scores.bits_per_byte:.4f} bits/byte"
                        + (f", agreement {tr.scores.agreement:.3f}" if tr.scores.agreement is not None else ""))
            agr = tr.scores.agreement
            return utility(tr.scores, setup.rule), (setup.rule.min_agreement - agr) if agr is not None else 0.0

        run_strategy(setup.strategy, setup.space, setup.instruct, setup.domains, setup.trials, setup.seed, tell,
                     constrained=setup.rule.rule == "constrained")
    trials = [seen[k] for k in dict.fromkeys(order)]
    pool = {t.id: t for t in [*fixed, *trials]}
    sel_id, met = select([(t.id, t.scores) for t in pool.values()], setup.rule)
    return SearchResult(trials=trials, fixed=fixed, instruct=instruct_trial, selected=pool[sel_id],
                        constraint_met=met, seconds=time.monotonic() - t0, memory_path=memory_path,
                        data={"domain_documents": data.domain_docs, "domain_bytes": data.domain_bytes,
                              "domain_windows": len(data.domain_items), "prompts": len(data.responses),
                              "response_tokens": sum(len(i.targets) for i in data.response_items),
                              "trial_cache": str(trial_dir)},
                        responses=list(data.responses))


def rows(result: SearchResult, rule: SelectRule) -> list[dict[str, Any]]:
    out = []
    for t in result.all:
        r = t.row(rule)
        r["selected"] = t.id == result.selected.id
        out.append(r)
    return out


def table_markdown(result: SearchResult, rule: SelectRule, task_names: Sequence[str] = ()) -> str:
    head = ["trial", "role", "merge", "bits/byte", "agreement", "token agr.", *task_names, "utility", "s", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows(result, rule):
        def f(v: Any, p: str = ".4f") -> str:
            return "" if v is None else format(v, p)

        tv = [f((r["tasks"].get(n) or {}).get("value")) for n in task_names]
        mark = "**selected**" if r["selected"] else ("" if r["feasible"] else "below min agreement")
        lines.append("| " + " | ".join([r["id"], r["role"], r["describe"], f(r["bits_per_byte"]),
                                          f(r["agreement"]), f(r["token_agreement"]), *tv, f(r["utility"]),
                                          f(r["seconds"], ".2f"), mark]) + " |")
    return "\n".join(lines) + "\n"


def table_csv(result: SearchResult, rule: SelectRule, task_names: Sequence[str] = ()) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "role", "method", "domain", "weights", "density", "bits_per_byte", "agreement",
                "token_agreement", *task_names, "utility", "feasible", "selected", "seconds", "path", "reused"])
    for r in rows(result, rule):
        c = r["candidate"]
        w.writerow([r["id"], r["role"], c["method"], c["domain"],
                    " ".join(f"{k}={v}" for k, v in c["weights"].items()), c.get("density", ""),
                    r["bits_per_byte"], r["agreement"], r["token_agreement"],
                    *[(r["tasks"].get(n) or {}).get("value") for n in task_names],
                    r["utility"], r["feasible"], r["selected"], r["seconds"], r["path"], r["reused"]])
    return buf.getvalue()


def pareto_png(result: SearchResult, rule: SelectRule, *, domain_label: str = "domain dev") -> bytes:
    """Domain bits/byte (x, lower is better) against instruction agreement (y); the Pareto front
    joined, the selected trial and the fixed 1.0/1.0 merge marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from finrecipe.search.objective import pareto_front

    pts = [(t.id, t.scores.bits_per_byte, t.scores.agreement or 0.0) for t in [*result.fixed, *result.trials]]
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    methods = sorted({t.candidate.method for t in result.trials})
    for m in methods:
        xs = [t.scores.bits_per_byte for t in result.trials if t.candidate.method == m]
        ys = [t.scores.agreement or 0.0 for t in result.trials if t.candidate.method == m]
        ax.scatter(xs, ys, s=22, alpha=0.75, label=m)
    fr = sorted((b, a) for i, b, a in pts if i in front)
    if len(fr) > 1:
        ax.plot([b for b, _ in fr], [a for _, a in fr], color="grey", lw=1, ls="--", label="Pareto front")
    for t in result.fixed:
        ax.scatter([t.scores.bits_per_byte], [t.scores.agreement or 0.0], marker="s", s=70, facecolors="none",
                   edgecolors="black", label="fixed 1.0/1.0" + (f" ({t.candidate.domain})" if len(result.fixed) > 1
                                                                else ""))
    s = result.selected
    ax.scatter([s.scores.bits_per_byte], [s.scores.agreement or 0.0], marker="*", s=220, color="crimson",
               label="selected", zorder=5)
    i = result.instruct.scores
    ax.scatter([i.bits_per_byte], [1.0], marker="^", s=60, color="black", label="instruct")
    if rule.rule == "constrained":
        ax.axhline(rule.min_agreement, color="crimson", lw=0.8, ls=":", label=f"min agreement {rule.min_agreement:g}")
    ax.set_xlabel(f"bits per byte on {domain_label} (lower is better)")
    ax.set_ylabel("instruction agreement (instruct = 1.0)")
    ax.set_title("merge search: domain knowledge vs instruction behaviour", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def sentence(result: SearchResult, rule: SelectRule, data_desc: str) -> str:
    s = result.selected
    a = s.scores.agreement
    txt = (f"Selected {s.candidate.describe()}: {s.scores.bits_per_byte:.4f} bits/byte on {data_desc}"
           + (f", instruction agreement {a:.3f} of the instruct model's" if a is not None else ""))
    if rule.rule == "constrained":
        txt += (f" (rule: best domain score with agreement ≥ {rule.min_agreement:g}"
                + ("" if result.constraint_met else "; NO trial met it, the most agreeable one was taken") + ")")
    else:
        txt += " (rule: weighted sum " + ", ".join(f"{k} {v:g}" for k, v in rule.weights.items()) + ")"
    for f in result.fixed:
        fa = f.scores.agreement
        txt += (f"; the fixed 1.0/1.0 merge: {f.scores.bits_per_byte:.4f} bits/byte"
                + (f", agreement {fa:.3f}" if fa is not None else ""))
    return txt + f"; {len(result.trials)} trials."


def trial_json(t: Trial, rule: SelectRule) -> dict[str, Any]:
    return t.row(rule)


def as_mapping(result: SearchResult) -> Mapping[str, Trial]:
    return {t.id: t for t in result.all}


__all__ = ["CACHE_VERSION", "SearchResult", "SearchSetup", "Trial", "pareto_png", "prepare", "rows",
           "run_search", "sentence", "table_csv", "table_markdown"]
