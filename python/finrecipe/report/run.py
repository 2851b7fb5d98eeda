"""The run record as the report reads it: `<workdir>/run.json` (written by `finrecipe apply`)
parsed once into typed nodes, leniently (absent keys read as None), and the summary part of
report.json that every report shares."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.errors import FormatError
from finrecipe.eval.results import EvalMetrics
from finrecipe.util.fmt import seconds


@dataclass
class NodeRecord:
    name: str
    type: str
    key: str
    status: str
    inputs: list[str]
    out_dir: Path | None
    model_dir: str | None
    seconds: float | None
    metrics: dict[str, Any]
    artifacts: dict[str, str]
    error: str | None
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> NodeRecord:
        sec = d.get("seconds")
        met = d.get("metrics")
        arts = d.get("artifacts")
        return cls(name=str(d.get("name")), type=str(d.get("type")), key=str(d.get("key", "")),
                   status=str(d.get("status")), inputs=[str(x) for x in (d.get("inputs") or [])],
                   out_dir=Path(d["out_dir"]) if d.get("out_dir") else None,
                   model_dir=d.get("model_dir") or None,
                   seconds=float(sec) if isinstance(sec, (int, float)) else None,
                   metrics=dict(met) if isinstance(met, Mapping) else {},
                   artifacts={str(k): str(v) for k, v in arts.items()} if isinstance(arts, Mapping) else {},
                   error=str(d["error"]) if d.get("error") is not None else None, raw=d)

    def artifact(self, name: str) -> Path | None:
        """The artifact's path (relative ones resolve against the node's output directory)."""
        v = self.artifacts.get(name)
        if v is None:
            return None
        p = Path(v)
        if not p.is_absolute() and self.out_dir is not None:
            p = self.out_dir / p
        return p

    @property
    def evaluation(self) -> EvalMetrics | None:
        """The node's evaluation results when it is an `evaluate` node."""
        if self.type == "evaluate" and EvalMetrics.is_eval_metrics(self.metrics):
            return EvalMetrics.from_json(self.metrics)
        return None


@dataclass
class RunRecord:
    recipe: Mapping[str, Any]
    finrecipe_version: str | None
    started: str | None
    finished: str | None
    nodes: list[NodeRecord]
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunRecord:
        rec = d.get("recipe")
        return cls(recipe=rec if isinstance(rec, Mapping) else {}, finrecipe_version=d.get("finrecipe_version"),
                   started=d.get("started"), finished=d.get("finished"),
                   nodes=[NodeRecord.from_json(n) for n in d.get("nodes", []) if isinstance(n, Mapping)], raw=d)

    @property
    def failed(self) -> list[NodeRecord]:
        return [n for n in self.nodes if n.status == "failed"]


def load_run(workdir: Path) -> RunRecord:
    p = Path(workdir) / "run.json"
    try:
        run = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{p} not found: run `finrecipe apply` first, or pass the recipe's work directory") from None
    except ValueError as e:
        raise FormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("nodes", []), list):
        raise FormatError(f"{p}: expected an object with a 'nodes' list")
    return RunRecord.from_json(run)


def run_summary(run: RunRecord | Mapping[str, Any]) -> dict[str, Any]:
    """The part of report.json every report shares: the recipe, timing, status counts and nodes."""
    raw = run.raw if isinstance(run, RunRecord) else run
    nodes = [n for n in raw.get("nodes", []) if isinstance(n, Mapping)]
    return {
        "recipe": raw.get("recipe"), "finrecipe_version": raw.get("finrecipe_version"),
        "started": raw.get("started"), "finished": raw.get("finished"),
        "counts": {s: sum(1 for n in nodes if n.get("status") == s)
                   for s in ("ran", "cached", "failed", "pending")},
        "nodes": [{k: n.get(k) for k in ("name", "type", "key", "status", "inputs", "out_dir", "model_dir",
                                          "seconds", "metrics", "artifacts")} for n in nodes],
    }


def fmt_seconds(s: float | None) -> str:
    return seconds(s)


__all__ = ["NodeRecord", "RunRecord", "fmt_seconds", "load_run", "run_summary"]
