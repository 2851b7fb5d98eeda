"""Evaluation suites: the protocol and the one registry (as `finrecipe.node` is for node kinds).

A suite is one module with one class and one registration line:

    class MySpec(SuiteSpec):              # strict pydantic model of one `tasks:` entry
        my_exam: str                      # the key that selects this suite (or `suite: my_exam`)
        limit: int | None = None

    @register
    class MyExam(Suite[MySpec]):
        name = "my_exam"                  # `suite: my_exam` in a task entry selects it
        keys = ("my_exam",)               # entry keys that also select it (`my_exam: FILE`)
        version = "1"                     # bump it when the suite's numbers change (cache keys follow)
        Spec = MySpec

        def run(self, spec, lm, ctx) -> list[TaskResult]: ...

and, where the defaults do not fit: `task_names` (the result columns it produces, for the stage's
task order), `inputs` (recipe datasets or models it reads), `requests` (what the person running
the recipe must grant: files outside the recipe's directories, a network host), `metrics` (how its
metrics are shown), `summarize` (a leaderboard view over its results, jfin).

`run` gets an `LM` (`finrecipe.eval.lm`: loglikelihood, loglikelihood_rolling, generate_until)
and a `SuiteContext` (the model's name, where to write outputs, the recipe's datasets, progress).
Suites are found by `get_suite(name)` or `suite_for_entry(mapping)`: built-ins are imported
lazily from the modules named in `BUILTIN`; a team's package can add suites through the entry-point
group `finrecipe.suites` (importing the named module registers them).
"""

from __future__ import annotations

import builtins
import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from finrecipe.errors import ConfigError
from finrecipe.eval.results import MetricInfo, TaskResult
from finrecipe.progress import NullProgress, Progress
from finrecipe.types import DatasetRef, Grants, ModelRef
from finrecipe.types import Request as Grant
from finrecipe.util.plugins import import_entry_points

if TYPE_CHECKING:
    from finrecipe.eval.lm import LM
    from finrecipe.node import CheckContext

KeyPath = tuple["str | int", ...]

InputKind = Literal["model", "dataset"]


class SuiteSpec(BaseModel):
    """Base of suite spec models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


SpecT = TypeVar("SpecT", bound=SuiteSpec)


@dataclass
class SuiteContext:
    """What a suite's `run` may use besides its spec and the model."""

    model: str  # the name of the model being scored (for output file names)
    out_dir: Path  # the evaluate node's output directory
    recipe_dir: Path = field(default_factory=Path.cwd)  # relative paths in the spec resolve here
    cache_dir: Path | None = None  # shared derived data (downloads)
    inputs: Mapping[str, ModelRef | DatasetRef] = field(default_factory=dict)
    progress: Progress = field(default_factory=NullProgress)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("finrecipe"))
    # name → path of files the suite wrote that the report may show (generations...)
    artifacts: dict[str, str] = field(default_factory=dict)
    # what the person running the recipe allowed (a judge's API key variable, hosts)
    grants: Grants = field(default_factory=Grants)

    def path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.recipe_dir / q

    def dataset(self, name: str) -> DatasetRef:
        ref = self.inputs.get(name)
        if not isinstance(ref, DatasetRef):
            raise ConfigError(f"evaluate: {name!r} is not a dataset of this recipe")
        return ref

    def output_file(self, task: str, suffix: str = ".jsonl") -> Path:
        """``<out_dir>/generations/<model>.<task>.jsonl`` (``:`` in the task name becomes ``-``)."""
        return self.out_dir / "generations" / f"{self.model}.{task.replace(':', '-')}{suffix}"


@dataclass
class Summary:
    """A suite's view over one model's results: the per-task results shown in the model's row
    (in order) and, for a leaderboard suite, its average and best prompt version, the per-version
    table, and detail kept in results.json."""

    tasks: list[TaskResult]
    average: float | None = None
    average_complete: bool = False
    best_version: str | None = None
    by_version: dict[str, dict[str, float | None]] | None = None
    version_averages: dict[str, float | None] | None = None
    detail: Any = None
    has_leaderboard: bool = False


class Suite(Generic[SpecT]):
    """Base of evaluation suites. Subclass, set the class attributes, implement `run`."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[str] = "1"
    Spec: ClassVar[builtins.type[SuiteSpec]]
    # metric name → how it is shown (default: a fraction shown ×100)
    metrics: ClassVar[Mapping[str, MetricInfo]] = {}

    def task_names(self, spec: SpecT) -> list[str]:
        """The result names (columns) this entry produces, known before running."""
        return [self.name]

    def inputs(self, spec: SpecT) -> Sequence[tuple[str, InputKind]]:
        """Recipe datasets or models the entry reads (become inputs of the evaluate node)."""
        return ()

    def requests(self, spec: SpecT, cc: CheckContext, where: KeyPath) -> Sequence[Grant]:
        """What the entry asks for that the recipe alone cannot allow (`finrecipe.node.NodeKind.requests`):
        `where` is the entry's key path below the node, e.g. ("tasks", 0). Default: nothing."""
        return ()

    def run(self, spec: SpecT, lm: LM, ctx: SuiteContext) -> list[TaskResult]:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def summarize(self, spec: SpecT, results: list[TaskResult]) -> Summary:
        """Default: every result is shown as it is."""
        return Summary(tasks=list(results))


# ------------------------------------------------------------------------------------ registry

REGISTRY: dict[str, Suite[Any]] = {}

# Built-in suites: name → the module that registers it (imported on first use). One line per suite.
BUILTIN: dict[str, str] = {
    "jfin": "finrecipe.eval.suites.jfin",
    "custom": "finrecipe.eval.suites.custom",
    "perplexity": "finrecipe.eval.suites.perplexity",
    "generate": "finrecipe.eval.suites.generate",
}
# Entry keys that select a built-in suite without `suite:` (checked in this order).
BUILTIN_KEYS: dict[str, str] = {"custom": "custom", "perplexity": "perplexity", "files": "perplexity",
                                "generate": "generate"}

ENTRY_POINT_GROUP = "finrecipe.suites"
S = TypeVar("S", bound=builtins.type[Suite[Any]])


def register(cls: S) -> S:
    """Class decorator: make a suite available under `cls.name` (and its `keys`)."""
    REGISTRY[cls.name] = cls()
    return cls


def _load_entry_points() -> None:
    import_entry_points(ENTRY_POINT_GROUP, "suite")


def known_suites() -> list[str]:
    _load_entry_points()
    return sorted(set(BUILTIN) | set(REGISTRY))


def get_suite(name: str) -> Suite[Any]:
    """The suite called `name`, importing its module on first use."""
    if name not in REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in REGISTRY:
        _load_entry_points()
    if name not in REGISTRY:
        raise ConfigError(f"unknown evaluation suite {name!r}; known: {', '.join(known_suites())}")
    return REGISTRY[name]


def suite_for_entry(entry: Mapping[str, Any]) -> Suite[Any] | None:
    """The suite a `tasks:` entry selects: `suite: NAME`, else the first of its keys that a suite
    claims (built-in keys first, in the documented order). None when no key selects one."""
    if "suite" in entry:
        return get_suite(str(entry["suite"]))
    for k in BUILTIN_KEYS:
        if k in entry:
            return get_suite(BUILTIN_KEYS[k])
    _load_entry_points()
    for s in list(REGISTRY.values()):
        if any(k in entry for k in s.keys):
            return s
    return None


def suite_of_spec(spec: SuiteSpec) -> Suite[Any]:
    """The registered suite whose `Spec` is the type of `spec`."""
    for s in REGISTRY.values():
        if type(spec) is s.Spec:
            return s
    raise ConfigError(f"no registered evaluation suite has the spec type {type(spec).__name__}")


def all_suites() -> list[Suite[Any]]:
    """Every suite: the built-ins in `BUILTIN` order, then the others in registration order."""
    builtin = [get_suite(name) for name in BUILTIN]
    return builtin + [s for n, s in REGISTRY.items() if n not in BUILTIN]


def metric_info(metric: str | None) -> MetricInfo:
    """How `metric` is shown, as the suite that computes it declares (default: ×100)."""
    if metric is not None:
        for s in all_suites():
            if metric in s.metrics:
                return s.metrics[metric]
    return MetricInfo()


def file_requests(cc: CheckContext, where: KeyPath, key: str, paths: Sequence[str]) -> list[Grant]:
    """Path requests for files an entry names under `key` (relative ones resolve like the recipe's)."""
    out: list[Grant] = []
    for p in paths:
        q = Path(p)
        full = q if q.is_absolute() else cc.base_dir((*where, key)) / q
        out += [r for r in cc.path_request(full, (*where, key)) if r.what not in {x.what for x in out}]
    return out


def selector_help() -> str:
    """The ways to select a suite in a `tasks:` entry, for error messages."""
    return ("`suite: jfin`, `custom: FILE`, `perplexity: DATASET` (or `files: [...]`), `generate: FILE`"
            + "".join(f", `suite: {n}`" for n in sorted(REGISTRY) if n not in BUILTIN))


def parse_task_entries(entries: list[Any]) -> list[Any]:
    """Each task entry of a list validated by its suite's Spec, the suite picked by the entry's
    distinguishing key (clear errors instead of union noise); specs and non-mappings pass through."""
    out = []
    for i, t in enumerate(entries):
        if isinstance(t, BaseModel) or not isinstance(t, Mapping):
            out.append(t)
            continue
        try:
            suite = suite_for_entry(t)
        except ConfigError as e:
            raise ValueError(f"tasks[{i}]: {e}") from None
        if suite is None:
            raise ValueError(f"tasks[{i}]: say what to run with one of {selector_help()}")
        out.append(suite.Spec.model_validate(t))
    return out


__all__ = ["BUILTIN", "REGISTRY", "InputKind", "Suite", "SuiteContext", "SuiteSpec", "Summary",
           "all_suites", "file_requests", "get_suite", "known_suites", "metric_info", "parse_task_entries", "register",
           "suite_for_entry", "suite_of_spec"]
