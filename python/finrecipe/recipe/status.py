"""A node's status — local, cached, stale (and why) or to run — decided in one place for `plan`,
`apply --dry-run` and `apply`, and the one node-state record all three report."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.recipe.graph import Node, RecipeGraph
from finrecipe.recipe.resolve import Resolved, trusts_remote_code
from finrecipe.types import InputRef, ModelRef, StageResult
from finrecipe.util.content import read_json

log = logging.getLogger("finrecipe.recipe")

MARKER = "DONE.json"
STATE_FILE = "state.json"
# The marker's own keys; any other key is a kind's `StageResult.extra` (e.g. a hub dataset's files).
MARKER_KEYS = frozenset({"node", "type", "key", "finished", "seconds", "finrecipe_version", "material",
                         "result"})


@dataclass
class NodeState:
    """Everything known about one node in one command: its key, status, inputs, output and result.

    status: "local" (a source that needs no build), "cached" (its marker is there), "stale" (it was
    built with another key; `reasons` says what changed), "to run"; during apply also "ran",
    "failed" or "pending" (not selected, or an input failed)."""

    name: str
    type: str
    key: str
    status: str
    inputs: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    model_dir: Path | None = None
    output: InputRef | None = None  # what downstream nodes receive (when local, cached or ran)
    result: StageResult | None = None
    seconds: float | None = None
    estimated_bytes: int | None = None
    partial: bool = False  # an unfinished out_dir exists (the run resumes from it)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ("local", "cached", "ran")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result.metrics if self.result is not None else {}

    @property
    def artifacts(self) -> dict[str, str]:
        return self.result.artifacts if self.result is not None else {}

    def plan_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "key": self.key, "status": self.status,
                "reasons": self.reasons, "inputs": self.inputs,
                "out_dir": str(self.out_dir) if self.out_dir else None,
                "model_dir": str(self.model_dir) if self.model_dir else None,
                "estimated_bytes": self.estimated_bytes, "partial": self.partial}

    def to_json(self) -> dict[str, Any]:
        """The node's entry in run.json (and `apply --json`)."""
        status = "cached" if self.status == "local" else self.status
        d = {"name": self.name, "type": self.type, "key": self.key, "status": status,
             "inputs": self.inputs, "out_dir": str(self.out_dir) if self.out_dir else None,
             "model_dir": str(self.model_dir) if self.model_dir else None,
             "seconds": None if self.seconds is None else round(self.seconds, 3),
             "metrics": self.metrics, "artifacts": self.artifacts}
        if self.error:
            d["error"] = self.error
        return d


def read_marker(r: Resolved) -> dict[str, Any] | None:
    """The node's completion marker when it is there, for this key, with its model directory."""
    if r.out_dir is None:
        return None
    m = read_json(r.out_dir / MARKER)
    if not isinstance(m, dict) or m.get("key") != r.key:
        return None
    md = (m.get("result") or {}).get("model_dir")
    if md and not (r.out_dir / md).is_dir():  # (relative, or absolute: `/` keeps absolute paths)
        log.warning("%s: marker present but the model directory %s is gone; rebuilding", r.out_dir, md)
        return None
    return m


def result_from_marker(r: Resolved, marker: Mapping[str, Any]) -> StageResult:
    assert r.out_dir is not None
    res = StageResult.from_json(marker.get("result") or {})
    if res.model_dir is not None and not res.model_dir.is_absolute():
        res.model_dir = r.out_dir / res.model_dir
    res.extra = {k: v for k, v in marker.items() if k not in MARKER_KEYS}
    return res


def last_state(recipe: RecipeGraph) -> dict[str, Any]:
    """The key and material each node had when last built or reused (`<workdir>/state.json`)."""
    state = read_json(recipe.workdir / STATE_FILE)
    nodes = state.get("nodes") if isinstance(state, dict) else None
    return nodes if isinstance(nodes, dict) else {}


def _reasons(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    from finrecipe.recipe.cache import diff_material

    if not old:
        return []
    out = []
    for d in diff_material(old.get("material"), new):
        if d.startswith("inputs."):
            name = d[len("inputs."):].split(":")[0].split(" ")[0]
            out.append(f"input {name!r} changed")
        elif d.startswith("config."):
            out.append("config " + d[len("config."):])
        else:
            out.append(d)
    return out


def node_state(recipe: RecipeGraph, node: Node, r: Resolved, last: Mapping[str, Any], *, allowed_code: frozenset[str] | None = None,
               force: bool = False) -> NodeState:
    """The status of `node` (the one place it is decided), with its output when it is done."""
    st = NodeState(node.name, node.type, r.key, "to run", inputs=list(node.deps), out_dir=r.out_dir)
    if r.unresolved:
        st.reasons = [r.unresolved]
        return st
    if r.local_output is not None:
        st.status = "local"
        st.output = r.local_output
        if isinstance(r.local_output, ModelRef):
            trust = trusts_remote_code(recipe, node.name, allowed_code)
            st.output = ModelRef(r.local_output.name, r.local_output.path, trust_remote_code=trust)
            st.model_dir = r.local_output.path
        st.estimated_bytes = r.size
        return st
    m = read_marker(r)
    if m is not None and not force:
        result = result_from_marker(r, m)
        out = output_ref(recipe, node, r, result, allowed_code)
        gone = output_gone(out)
        if gone is None:
            st.status = "cached"
            st.result = result
            st.model_dir = result.model_dir
            st.seconds = m.get("seconds")
            st.output = out
            return st
        log.warning("%s: marker present but %s is gone; rebuilding", r.out_dir, gone)
    old = last.get(node.name)
    if isinstance(old, dict) and old.get("key") != r.key:
        st.status = "stale"
        st.reasons = _reasons(old, r.material) or ["inputs changed"]
    st.partial = bool(r.out_dir and r.out_dir.is_dir())
    if node.kind.produces_model and r.out_dir is not None:
        st.model_dir = r.out_dir / "model"
    return st


def output_gone(out: InputRef | None) -> str | None:
    """A path of a finished node's output that no longer exists (e.g. deleted from the Hugging Face
    cache), or None."""
    if isinstance(out, ModelRef):
        return None if out.path.is_dir() else str(out.path)
    for f in getattr(out, "files", ()):
        if not Path(f).is_file():
            return str(f)
    return None


def output_ref(recipe: RecipeGraph, node: Node, r: Resolved, result: StageResult,
               allowed_code: frozenset[str] | None) -> InputRef | None:
    assert r.out_dir is not None
    return node.kind.output(node.name, node.config, r.out_dir, result,
                            trusts_remote_code(recipe, node.name, allowed_code))


def input_refs(node: Node, states: Mapping[str, NodeState]) -> dict[str, InputRef]:
    """The outputs of `node`'s inputs that exist (all of them once its inputs are done)."""
    return {d: states[d].output for d in node.deps if states[d].output is not None}  # type: ignore[misc]


def dir_size(p: Path) -> int:
    total = 0
    for root, _d, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def estimate(recipe: RecipeGraph, node: Node, st: NodeState, states: Mapping[str, NodeState]) -> int | None:
    """Output size for `plan`: measured when cached, else the kind's estimate, else (a model) the
    size of the largest input model."""
    if st.status == "local":
        return st.estimated_bytes
    if st.status == "cached":
        return dir_size(st.out_dir) if st.out_dir else None
    est = None
    with contextlib.suppress(Exception):  # an estimate only
        est = node.kind.estimate_output_bytes(node.config, input_refs(node, states))
    if est is None and node.kind.produces_model:
        known_i = [b for d in node.deps
                   if recipe.nodes[d].provides == "model" and (b := states[d].estimated_bytes)]
        est = max(known_i) if known_i else None
    return est
