"""What a command returns and leaves behind: the plan, the result of an apply, the run record
(`<workdir>/run.json`) and the node keys of the last apply (`<workdir>/state.json`)."""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe import __version__
from finrecipe.recipe.graph import RecipeGraph
from finrecipe.recipe.status import STATE_FILE, NodeState
from finrecipe.types import Request
from finrecipe.util.content import read_json, sha256_file
from finrecipe.util.fs import write_json_atomic

log = logging.getLogger("finrecipe.recipe")

RUN_FILE = "run.json"

# Backwards-compatible names: a plan's node and an apply's node are the same record.
PlanNode = NodeState
NodeRecord = NodeState


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Plan:
    recipe: str
    file: Path
    workdir: Path
    nodes: list[NodeState]
    # what the recipe asks the user to allow, and whether the current grants allow it
    requests: list[tuple[Request, bool]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "file": str(self.file), "workdir": str(self.workdir),
                "nodes": [n.plan_json() for n in self.nodes],
                "requests": [{"kind": r.kind, "what": r.what, "why": r.why, "grant": r.option,
                              "granted": ok} for r, ok in self.requests]}

    @property
    def to_run(self) -> list[str]:
        return [n.name for n in self.nodes if n.status in ("stale", "to run")]


@dataclass
class ApplyResult:
    recipe: str
    workdir: Path
    nodes: list[NodeState]
    started: str
    finished: str
    seconds: float
    dry_run: bool = False
    would_run: list[str] = field(default_factory=list)  # dry run: what apply would run
    lock_written: bool = False
    log_file: Path | None = None
    report: Path | None = None  # report.md

    @property
    def report_html(self) -> Path | None:
        """`<workdir>/report.html` when the report package wrote it."""
        p = self.workdir / "report.html"
        return p if p.is_file() else None

    @property
    def evaluations(self) -> list[NodeState]:
        """The nodes that have evaluation scores (metrics schema `finrecipe.evaluate/1`), in order."""
        return [n for n in self.nodes if n.status in ("ran", "cached")
                and isinstance(n.metrics.get("models"), dict)]

    @property
    def ran(self) -> list[str]:
        return [n.name for n in self.nodes if n.status == "ran"]

    @property
    def cached(self) -> list[str]:
        return [n.name for n in self.nodes if n.status in ("cached", "local")]

    @property
    def noop(self) -> bool:
        return not self.ran and not any(n.status in ("failed", "pending") for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "workdir": str(self.workdir), "started": self.started,
                "finished": self.finished, "seconds": round(self.seconds, 3), "dry_run": self.dry_run,
                "nodes": [n.to_json() for n in self.nodes]}


def write_state(recipe: RecipeGraph, nodes: dict[str, Any]) -> None:
    write_json_atomic(recipe.workdir / STATE_FILE, {"version": 1, "nodes": nodes})


def write_run(recipe: RecipeGraph, result: ApplyResult) -> None:
    rec = {"recipe": {"name": recipe.name, "file": str(recipe.file), "sha256": sha256_file(recipe.file)},
           "finrecipe_version": __version__, "started": result.started, "finished": result.finished,
           "nodes": [n.to_json() for n in result.nodes]}
    write_json_atomic(recipe.workdir / RUN_FILE, rec)


def run_record_current(workdir: Path, result: ApplyResult) -> bool:
    """Whether run.json already describes this (fully built, unchanged) state of the recipe."""
    prev = read_json(workdir / RUN_FILE)
    if not isinstance(prev, dict) or not isinstance(prev.get("nodes"), list):
        return False
    old = {n.get("name"): (n.get("key"), n.get("status")) for n in prev["nodes"] if isinstance(n, dict)}
    return len(old) == len(result.nodes) and all(
        n.name in old and old[n.name][0] == n.key and old[n.name][1] in ("ran", "cached")
        and n.status in ("cached", "local") for n in result.nodes)


def report_current(workdir: Path) -> Path | None:
    """report.md when it exists and is not older than the run record; else None (rebuild it)."""
    md, run = workdir / "report.md", workdir / RUN_FILE
    try:
        if md.stat().st_mtime_ns >= run.stat().st_mtime_ns:
            return md
    except OSError:
        pass
    return None


def build_report(workdir: Path) -> Path | None:
    """The full report (`finrecipe.report`), or the basic one when the full one fails."""
    import finrecipe.report as rep

    try:
        out = rep.build_report(workdir)
        return Path(out) if isinstance(out, (str, Path)) else workdir / "report.md"
    except Exception:  # a report must never hide the outcome of the build
        log.exception("finrecipe.report.build_report failed; writing the basic report instead")
    try:
        return Path(rep.build_basic_report(workdir))
    except Exception:
        log.exception("writing the basic report failed")
        return None
