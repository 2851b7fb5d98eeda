"""Resolving, planning and applying a recipe.

- resolve: every node gets a cache key, in execution order (sources are hashed by content, hub
  revisions resolved to commits, stages keyed by type + version + config + input keys);
- plan: per node cached / stale (and why) / to run, from the markers and `<workdir>/state.json`;
- apply: run what is not cached; `<workdir>/<node>/<key>/DONE.json` is written last.

Nothing here imports torch; stage kinds and `init:` sources do that only when they really run.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe import __version__
from finrecipe.errors import (
    DataError,
    FinrecipeError,
    IoError,
    LockMismatchError,
    RecipeError,
    StageError,
)
from finrecipe.progress import NullProgress, Progress
from finrecipe.recipe.cache import (
    MARKER,
    ShaCache,
    diff_material,
    digest,
    read_json,
    tree_digest,
    write_json_atomic,
)
from finrecipe.recipe.core import Node, Recipe
from finrecipe.recipe.schema import infer_format
from finrecipe.stages.base import DatasetRef, ModelRef, StageContext, StageResult

log = logging.getLogger("finrecipe.recipe")

STATE_FILE = "state.json"
RUN_FILE = "run.json"
SHA_CACHE = ".cache/sha256.json"


# ---------------------------------------------------------------------------- resolution

@dataclass
class Resolved:
    key: str
    material: dict[str, Any]
    local: bool = False  # nothing to build (a local model directory, local dataset files)
    out_dir: Path | None = None  # <workdir>/<node>/<key> for buildable nodes
    model_dir: Path | None = None
    dataset: DatasetRef | None = None
    lock_entry: dict[str, Any] | None = None
    size: int | None = None  # bytes of a local source
    unresolved: str | None = None  # why the key is unknown (`plan` offline, hub revision not locked)


UNRESOLVED = "unresolved"


def _rel(p: Path, base: Path) -> str:
    return Path(os.path.relpath(p, base)).as_posix()


def _load_lock(recipe: Recipe) -> dict[str, Any] | None:
    import yaml

    p = recipe.lock_path
    if not p.is_file():
        return None
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LockMismatchError(f"{p}: unreadable lockfile ({e}); delete it and run `finrecipe lock`"
                                ) from None
    return d if isinstance(d, dict) else None


def _locked_commit(lock: Mapping[str, Any] | None, section: str, name: str, repo: str,
                   revision: str | None) -> str | None:
    if not lock:
        return None
    e = (lock.get(section) or {}).get(name) or {}
    if e.get("hub") == repo and e.get("revision") == revision and isinstance(e.get("commit"), str):
        return str(e["commit"])
    return None


def resolve(recipe: Recipe, *, shas: ShaCache, lock: Mapping[str, Any] | None = None,
            refresh: bool = False, allow_unresolved: bool = False) -> dict[str, Resolved]:
    """Cache keys and resolved sources of all nodes, in execution order.

    Hub revisions that are not commit hashes are taken from the lockfile when it has them for the
    same repo and revision (no network), else resolved on the hub; `refresh` always asks the hub.
    With `allow_unresolved` (for `plan`), a hub revision that cannot be resolved leaves that node
    and everything downstream without a key instead of failing.
    """
    from finrecipe import sources

    out: dict[str, Resolved] = {}
    for node in recipe:
        bad = next((d for d in node.deps if out[d].unresolved), None)
        if bad is not None:
            out[node.name] = Resolved(UNRESOLVED, {}, unresolved=f"input {bad!r} is not resolved")
            continue
        is_hub = (node.model is not None and node.model.hub is not None) or \
            (node.dataset is not None and node.dataset.hub is not None)
        try:
            if node.model is not None:
                out[node.name] = _resolve_model(recipe, node, out, shas, lock, refresh, sources)
                continue
            if node.dataset is not None:
                out[node.name] = _resolve_dataset(recipe, node, shas, lock, refresh, sources)
                continue
        except IoError as e:
            if not (allow_unresolved and is_hub):
                raise
            rev = (node.model or node.dataset).revision  # type: ignore[union-attr]
            out[node.name] = Resolved(UNRESOLVED, {}, unresolved=(
                f"hub revision {rev or 'main'!r} not resolved (no network?); run `finrecipe lock` "
                "where the hub is reachable, or pin a commit"))
            log.debug("unresolved %s: %s", node.name, e)
            continue
        assert node.kind is not None and node.config is not None
        material = {"type": node.type, "version": str(node.kind.version),
                    "config": node.kind.cache_config(node.config),
                    "inputs": {d: out[d].key for d in sorted(node.deps)}}
        key = digest(material)
        od = recipe.workdir / node.name / key
        out[node.name] = Resolved(key, material, out_dir=od,
                                  model_dir=od / "model" if node.kind.produces_model else None)
    return out


def _resolve_model(recipe: Recipe, node: Node, done: Mapping[str, Resolved], shas: ShaCache,
                   lock: Mapping[str, Any] | None, refresh: bool, sources: Any) -> Resolved:
    spec = node.model
    assert spec is not None
    kp = ("models", node.name)
    if spec.path is not None:
        p = (recipe.loaded.base_dir(kp + ("path",)) / spec.path).absolute()
        if not p.is_dir():
            raise RecipeError(f"model directory not found: {p}", **recipe.loaded.where(kp + ("path",)))
        d, files = tree_digest(p, shas, (*sources.MODEL_PATTERNS, *sources.PICKLE_PATTERNS))
        if not files:
            raise RecipeError(f"{p} holds no model files (*.safetensors, config.json, ...)",
                              **recipe.loaded.where(kp + ("path",)))
        material: dict[str, Any] = {"source": "path", "content": d}
        return Resolved(digest(material), material, local=True, model_dir=p,
                        lock_entry={"path": _rel(p, recipe.recipe_dir), "content": d},
                        size=sum(f["size"] for f in files))
    if spec.hub is not None:
        commit = None if refresh else _locked_commit(lock, "models", node.name, spec.hub, spec.revision)
        if commit is None or sources.is_commit(spec.revision):
            commit = sources.hub_resolve_commit(spec.hub, spec.revision, "model")
        material = {"source": "hub", "repo": spec.hub, "commit": commit, "allow_pickle": spec.allow_pickle}
        key = digest(material)
        od = recipe.workdir / node.name / key
        return Resolved(key, material, out_dir=od, model_dir=od / "model",
                        lock_entry={"hub": spec.hub, "revision": spec.revision, "commit": commit})
    init = spec.init
    assert init is not None
    tok: Any = None
    if init.tokenizer is not None:
        if init.tokenizer in recipe.nodes:
            tok = {"model": done[init.tokenizer].key}
        else:
            tp = (recipe.loaded.base_dir(kp + ("init", "tokenizer")) / init.tokenizer).absolute()
            if not tp.is_dir():
                raise RecipeError(f"tokenizer: neither a model of this recipe nor a directory: {tp}",
                                  **recipe.loaded.where(kp + ("init", "tokenizer")))
            tok = {"content": tree_digest(tp, shas, sources.TOKENIZER_PATTERNS)[0]}
    material = {"source": "init", "config": init.config, "seed": init.seed, "dtype": init.dtype,
                "tokenizer": tok, "version": sources.INIT_VERSION}
    key = digest(material)
    od = recipe.workdir / node.name / key
    return Resolved(key, material, out_dir=od, model_dir=od / "model")


def _resolve_dataset(recipe: Recipe, node: Node, shas: ShaCache, lock: Mapping[str, Any] | None,
                     refresh: bool, sources: Any) -> Resolved:
    spec = node.dataset
    assert spec is not None
    kp = ("datasets", node.name)
    if spec.hub is None:
        base = recipe.loaded.base_dir(kp + ("files",))
        try:
            files = sources.expand_globs(spec.patterns, base)
        except DataError as e:
            raise RecipeError(_missing_files_msg(e, spec.description),
                              **recipe.loaded.where(kp + ("files",))) from None
        fmt = spec.format or _infer(recipe, node, files)
        hashed = []
        for f in files:
            sha, size = shas.sha256(f)
            hashed.append((f, sha, size))
        material = {"source": "files", "format": fmt, "text_field": spec.text_field, "weight": spec.weight,
                    "files": [{"name": _rel(f, base), "sha256": sha} for f, sha, _ in hashed]}
        ref = DatasetRef(node.name, tuple(f for f, _, _ in hashed), fmt, spec.text_field, spec.weight,
                         tuple(s for _, s, _ in hashed))
        files_entry = {"files": [{"path": _rel(f, recipe.recipe_dir), "size": size, "sha256": sha}
                           for f, sha, size in hashed]}
        return Resolved(digest(material), material, local=True, dataset=ref, lock_entry=files_entry,
                        size=sum(s for _, _, s in hashed))
    commit = None if refresh else _locked_commit(lock, "datasets", node.name, spec.hub, spec.revision)
    if commit is None or sources.is_commit(spec.revision):
        commit = sources.hub_resolve_commit(spec.hub, spec.revision, "dataset")
    material = {"source": "hub", "repo": spec.hub, "commit": commit, "patterns": spec.patterns,
                "format": spec.format, "text_field": spec.text_field, "weight": spec.weight}
    key = digest(material)
    od = recipe.workdir / node.name / key
    entry: dict[str, Any] = {"hub": spec.hub, "revision": spec.revision, "commit": commit}
    res = Resolved(key, material, out_dir=od, lock_entry=entry)
    marker = read_json(od / MARKER)
    if isinstance(marker, dict) and marker.get("dataset_files"):
        _attach_hub_dataset(recipe, node, res, marker["dataset_files"])
    return res


def _missing_files_msg(e: DataError, description: str | None) -> str:
    """The glob error, with the dataset's `description:` (what to put there) when it has one."""
    msg = str(e)
    if description and description.strip():
        msg += f"; expected: {' '.join(description.split())}"
    return msg


def _infer(recipe: Recipe, node: Node, files: list[Path]) -> Any:
    fmts = {infer_format(f.name) for f in files}
    if None in fmts or len(fmts) != 1:
        where = ("datasets", node.name, "files")
        raise RecipeError("cannot infer the format of " + ", ".join(f.name for f in files[:3])
                          + "; set 'format:' to jsonl, parquet or text", **recipe.loaded.where(where))
    return fmts.pop()


def _attach_hub_dataset(recipe: Recipe, node: Node, res: Resolved, files: list[dict[str, Any]]) -> None:
    spec = node.dataset
    assert spec is not None and res.out_dir is not None
    paths = tuple(res.out_dir / "data" / f["path"] for f in files)
    fmt = spec.format or _infer(recipe, node, list(paths))
    res.dataset = DatasetRef(node.name, paths, fmt, spec.text_field, spec.weight,
                             tuple(f["sha256"] for f in files))
    assert res.lock_entry is not None
    res.lock_entry["files"] = [dict(f) for f in files]


# ---------------------------------------------------------------------------- lockfile

def lock_document(recipe: Recipe, res: Mapping[str, Resolved]) -> dict[str, Any]:
    doc: dict[str, Any] = {"finrecipe_version": __version__, "recipe": recipe.name,
                           "models": {}, "datasets": {}}
    for node in recipe:
        r = res[node.name]
        if r.lock_entry is None:
            continue
        doc["models" if node.section == "models" else "datasets"][node.name] = copy.deepcopy(r.lock_entry)
    return doc


def compare_lock(lock: Mapping[str, Any] | None, doc: Mapping[str, Any], lock_path: Path) -> list[str]:
    """What resolves differently from the lockfile (empty when nothing does)."""
    if lock is None:
        return [f"there is no lockfile {lock_path.name}; run `finrecipe lock` (or `apply` without --locked)"]
    diffs: list[str] = []
    for section in ("models", "datasets"):
        old = lock.get(section) or {}
        new = doc.get(section) or {}
        for name in new:
            if name not in old:
                diffs.append(f"{section}.{name}: not in the lockfile")
                continue
            o, n = old[name], new[name]
            for k in sorted(set(o) | set(n)):
                if k == "files":
                    if "files" in o and "files" in n:
                        diffs.extend(_diff_files(f"{section}.{name}", o["files"], n["files"]))
                    continue
                if o.get(k) != n.get(k):
                    diffs.append(f"{section}.{name}.{k}: locked {o.get(k)!r}, now {n.get(k)!r}")
        for name in old:
            if name not in new:
                diffs.append(f"{section}.{name}: in the lockfile but no longer in the recipe")
    return diffs


def _diff_files(where: str, old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    o = {f["path"]: f for f in old}
    n = {f["path"]: f for f in new}
    out = []
    for p in sorted(set(o) | set(n)):
        if p not in o:
            out.append(f"{where}: file {p} is new (not in the lockfile)")
        elif p not in n:
            out.append(f"{where}: file {p} is locked but no longer matched")
        elif o[p].get("sha256") != n[p].get("sha256"):
            out.append(f"{where}: file {p} changed (size {o[p].get('size')} → {n[p].get('size')}, "
                       f"sha256 {str(o[p].get('sha256'))[:12]} → {str(n[p].get('sha256'))[:12]})")
    return out


def _write_lock_file(path: Path, doc: Mapping[str, Any]) -> None:
    import yaml

    text = ("# Written by finrecipe (`finrecipe lock` / `apply`): what this recipe resolved to.\n"
            "# Commit it with the recipe; `finrecipe apply --locked` refuses to run when anything differs.\n"
            + yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IoError(f"{path}: cannot write the lockfile: {e.strerror}") from None


def _update_lock(recipe: Recipe, lock: Mapping[str, Any] | None, doc: Mapping[str, Any]) -> bool:
    if lock is not None and _same_lock(lock, doc):
        return False
    _write_lock_file(recipe.lock_path, doc)
    return True


def _same_lock(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a.get("models") or {}) == (b.get("models") or {}) and \
        (a.get("datasets") or {}) == (b.get("datasets") or {}) and \
        a.get("finrecipe_version") == b.get("finrecipe_version") and a.get("recipe") == b.get("recipe")


def write_lock(recipe: Recipe, *, refresh: bool = True) -> Path:
    shas = ShaCache(recipe.workdir / SHA_CACHE)
    lock = _load_lock(recipe)
    res = resolve(recipe, shas=shas, lock=lock, refresh=refresh)
    shas.save()
    _write_lock_file(recipe.lock_path, lock_document(recipe, res))
    return recipe.lock_path


# ---------------------------------------------------------------------------- plan

@dataclass
class PlanNode:
    name: str
    type: str
    key: str
    status: str  # "cached" | "stale" | "to run" | "local"
    reasons: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    model_dir: Path | None = None
    estimated_bytes: int | None = None
    partial: bool = False  # an unfinished out_dir exists (the run resumes from it)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "key": self.key, "status": self.status,
                "reasons": self.reasons, "inputs": self.inputs,
                "out_dir": str(self.out_dir) if self.out_dir else None,
                "model_dir": str(self.model_dir) if self.model_dir else None,
                "estimated_bytes": self.estimated_bytes, "partial": self.partial}


@dataclass
class Plan:
    recipe: str
    file: Path
    workdir: Path
    nodes: list[PlanNode]

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "file": str(self.file), "workdir": str(self.workdir),
                "nodes": [n.to_json() for n in self.nodes]}

    @property
    def to_run(self) -> list[str]:
        return [n.name for n in self.nodes if n.status in ("stale", "to run")]


def _dir_size(p: Path) -> int:
    total = 0
    for root, _d, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def _marker(res: Resolved) -> dict[str, Any] | None:
    if res.out_dir is None:
        return None
    m = read_json(res.out_dir / MARKER)
    if not isinstance(m, dict) or m.get("key") != res.key:
        return None
    md = (m.get("result") or {}).get("model_dir")
    if md and not (res.out_dir / md).is_dir():  # (relative, or absolute: `/` keeps absolute paths)
        log.warning("%s: marker present but the model directory %s is gone; rebuilding", res.out_dir, md)
        return None
    return m


def _result_from_marker(res: Resolved, marker: Mapping[str, Any]) -> StageResult:
    assert res.out_dir is not None
    r = StageResult.from_json(marker.get("result") or {})
    if r.model_dir is not None and not r.model_dir.is_absolute():
        r.model_dir = res.out_dir / r.model_dir
    return r


def _reasons(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
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


def _input_refs(recipe: Recipe, node: Node, res: Mapping[str, Resolved]
                ) -> dict[str, ModelRef | DatasetRef]:
    refs: dict[str, ModelRef | DatasetRef] = {}
    for d in node.deps:
        dn, dr = recipe.nodes[d], res[d]
        if dn.provides == "dataset":
            if dr.dataset is not None:
                refs[d] = dr.dataset
        elif dr.model_dir is not None:
            refs[d] = ModelRef(d, dr.model_dir, trust_remote_code=_trusts_remote_code(recipe, d))
    return refs


def _trusts_remote_code(recipe: Recipe, name: str) -> bool:
    """A source's `trust_remote_code`; a stage output inherits it from any of its model inputs
    (a model trained from a custom-code architecture needs the same code to load)."""
    node = recipe.nodes[name]
    if node.model is not None:
        return bool(node.model.trust_remote_code)
    return any(_trusts_remote_code(recipe, d) for d in node.deps if recipe.nodes[d].provides == "model")


def make_plan(recipe: Recipe, *, progress: Progress | None = None,
              res: Mapping[str, Resolved] | None = None) -> Plan:
    if res is None:
        shas = ShaCache(recipe.workdir / SHA_CACHE)
        res = resolve(recipe, shas=shas, lock=_load_lock(recipe), allow_unresolved=True)
        shas.save()
    state = read_json(recipe.workdir / STATE_FILE) or {}
    last = state.get("nodes", {}) if isinstance(state, dict) else {}
    nodes = []
    by_name: dict[str, PlanNode] = {}
    for node in recipe:
        r = res[node.name]
        pn = PlanNode(node.name, node.type, r.key, "to run", inputs=list(node.deps), out_dir=r.out_dir)
        if r.unresolved:
            pn.reasons = [r.unresolved]
        elif r.local:
            pn.status = "local"
            pn.model_dir = r.model_dir
            pn.estimated_bytes = r.size
        else:
            m = _marker(r)
            if m is not None:
                pn.status = "cached"
                res_ = _result_from_marker(r, m)
                pn.model_dir = res_.model_dir
                pn.estimated_bytes = _dir_size(r.out_dir) if r.out_dir else None
            else:
                old = last.get(node.name)
                if isinstance(old, dict) and old.get("key") != r.key:
                    pn.status = "stale"
                    pn.reasons = _reasons(old, r.material) or ["inputs changed"]
                pn.partial = bool(r.out_dir and r.out_dir.is_dir())
                if node.kind is not None and node.config is not None:
                    with contextlib.suppress(Exception):  # an estimate only
                        pn.estimated_bytes = node.kind.estimate_output_bytes(
                            node.config, _input_refs(recipe, node, res))
                    if pn.estimated_bytes is None and node.kind.produces_model:
                        # a rough guess: a trained or merged model is about as large as its inputs
                        known = [by_name[d].estimated_bytes for d in node.deps
                                 if recipe.nodes[d].provides == "model" and by_name[d].estimated_bytes]
                        pn.estimated_bytes = max(known) if known else None  # type: ignore[type-var]
                if node.kind is not None and node.kind.produces_model and r.out_dir is not None:
                    pn.model_dir = r.out_dir / "model"
                elif node.model is not None:
                    pn.model_dir = r.model_dir
        nodes.append(pn)
        by_name[node.name] = pn
    return Plan(recipe.name, recipe.file, recipe.workdir, nodes)


# ---------------------------------------------------------------------------- validate

def validate_deep(recipe: Recipe) -> list[str]:
    """Local paths exist; stage configs checked against local input models (no hashing)."""
    from finrecipe import sources

    notes: list[str] = []
    local_models: dict[str, Path] = {}
    for node in recipe:
        kp = (node.section, node.name)
        if node.model is not None and node.model.path is not None:
            p = (recipe.loaded.base_dir(kp + ("path",)) / node.model.path).absolute()
            if not p.is_dir():
                raise RecipeError(f"model directory not found: {p}", **recipe.loaded.where(kp + ("path",)))
            local_models[node.name] = p
        if node.model is not None and node.model.init is not None and node.model.init.tokenizer:
            tok = node.model.init.tokenizer
            if tok not in recipe.nodes:
                tp = (recipe.loaded.base_dir(kp + ("init", "tokenizer")) / tok).absolute()
                if not tp.is_dir():
                    raise RecipeError(f"tokenizer: neither a model of this recipe nor a directory: {tp}",
                                      **recipe.loaded.where(kp + ("init", "tokenizer")))
        if node.dataset is not None and node.dataset.hub is None:
            try:
                sources.expand_globs(node.dataset.patterns, recipe.loaded.base_dir(kp + ("files",)))
            except DataError as e:
                raise RecipeError(_missing_files_msg(e, node.dataset.description),
                                  **recipe.loaded.where(kp + ("files",))) from None
        if node.kind is not None and node.config is not None:
            avail: dict[str, ModelRef | DatasetRef] = {
                d: ModelRef(d, local_models[d]) for d in node.deps if d in local_models}
            if node.deps and len(avail) == len(node.deps):
                try:
                    node.kind.check(node.config, avail)
                except RecipeError as e:
                    raise recipe._relocate(e) from None
                except FinrecipeError as e:
                    raise type(e)(f"stages.{node.name}: {e}") from None
                notes.append(f"{node.name}: {node.type} config checked against "
                             + ", ".join(sorted(avail)))
    return notes


# ---------------------------------------------------------------------------- apply

@dataclass
class NodeRecord:
    name: str
    type: str
    key: str
    status: str  # "ran" | "cached" | "failed" | "pending"
    inputs: list[str]
    out_dir: Path | None = None
    model_dir: Path | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "type": self.type, "key": self.key, "status": self.status,
             "inputs": self.inputs, "out_dir": str(self.out_dir) if self.out_dir else None,
             "model_dir": str(self.model_dir) if self.model_dir else None,
             "seconds": None if self.seconds is None else round(self.seconds, 3),
             "metrics": self.metrics, "artifacts": self.artifacts}
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class ApplyResult:
    recipe: str
    workdir: Path
    nodes: list[NodeRecord]
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
    def evaluations(self) -> list[NodeRecord]:
        """The evaluate nodes that have scores (metrics schema `finrecipe.evaluate/1`), in order."""
        return [n for n in self.nodes if n.type == "evaluate" and n.status in ("ran", "cached")
                and isinstance(n.metrics.get("models"), dict)]

    @property
    def ran(self) -> list[str]:
        return [n.name for n in self.nodes if n.status == "ran"]

    @property
    def cached(self) -> list[str]:
        return [n.name for n in self.nodes if n.status == "cached"]

    @property
    def noop(self) -> bool:
        return not self.ran and not any(n.status in ("failed", "pending") for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "workdir": str(self.workdir), "started": self.started,
                "finished": self.finished, "seconds": round(self.seconds, 3), "dry_run": self.dry_run,
                "nodes": [n.to_json() for n in self.nodes]}


_NULL_TASK = NullProgress().task("")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Refuse a second concurrent apply on the same workdir (the OS drops the lock on SIGKILL)."""
    import fcntl

    workdir.mkdir(parents=True, exist_ok=True)
    p = workdir / ".apply.lock"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = ""
            with contextlib.suppress(OSError, ValueError):
                other = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            raise FinrecipeError(f"another `finrecipe apply` is running on {workdir}{other}; wait for it "
                                 "to finish (two applies on one workdir would overwrite each other)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _log_to(workdir: Path) -> Iterator[Path]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = logs / f"apply-{stamp}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("finrecipe")
    old_level = root.level
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def apply(recipe: Recipe, *, only: list[str], force: list[str], dry_run: bool, locked: bool,
          progress: Progress | None = None, write_lock: bool = True) -> ApplyResult:
    progress = progress or NullProgress()
    recipe.check_names(only, "--only")
    recipe.check_names(force, "--force")
    t0 = time.monotonic()
    started = _now()
    if dry_run:
        return _dry_run(recipe, only, force, locked, started, t0)
    with workdir_lock(recipe.workdir), _log_to(recipe.workdir) as logfile:
        log.info("apply %s (%s), finrecipe %s", recipe.name, recipe.file, __version__)
        return _apply_locked(recipe, only, force, locked, progress, started, t0, logfile,
                             write_lock=write_lock)


def _selection(recipe: Recipe, only: list[str], force: list[str]) -> set[str]:
    return set(recipe.ancestors(only)) if only else set(recipe.order)


def _dry_run(recipe: Recipe, only: list[str], force: list[str], locked: bool, started: str,
             t0: float) -> ApplyResult:
    shas = ShaCache(recipe.workdir / SHA_CACHE)
    lock = _load_lock(recipe)
    res = resolve(recipe, shas=shas, lock=lock)
    if locked:
        diffs = compare_lock(lock, lock_document(recipe, res), recipe.lock_path)
        if diffs:
            raise LockMismatchError(_lock_msg(recipe, diffs))
    plan = make_plan(recipe, res=res)
    sel = _selection(recipe, only, force)
    records = []
    would_run = []
    for pn in plan.nodes:
        done = pn.status == "local" or (pn.status == "cached" and pn.name not in force)
        if not done and pn.name in sel:
            would_run.append(pn.name)
        records.append(NodeRecord(pn.name, pn.type, pn.key, "cached" if done else "pending", pn.inputs,
                                  pn.out_dir, pn.model_dir))
    return ApplyResult(recipe.name, recipe.workdir, records, started, _now(), time.monotonic() - t0,
                       dry_run=True, would_run=would_run)


def _lock_msg(recipe: Recipe, diffs: list[str]) -> str:
    return (f"{recipe.lock_path}: the recipe no longer resolves as locked:\n  - " + "\n  - ".join(diffs)
            + "\nrun without --locked to update the lockfile, or restore the locked inputs")


def _apply_locked(recipe: Recipe, only: list[str], force: list[str], locked: bool, progress: Progress,
                  started: str, t0: float, logfile: Path, *, write_lock: bool = True) -> ApplyResult:
    shas = ShaCache(recipe.workdir / SHA_CACHE)
    lock = _load_lock(recipe)
    res = resolve(recipe, shas=shas, lock=lock)
    shas.save()
    doc = lock_document(recipe, res)
    if locked:
        diffs = compare_lock(lock, doc, recipe.lock_path)
        if diffs:
            log.error("lock mismatch: %s", diffs)
            raise LockMismatchError(_lock_msg(recipe, diffs))
    lock_written = False
    if not locked and write_lock:
        lock_written = _update_lock(recipe, lock, doc)
        lock = doc if lock_written else lock
    sel = _selection(recipe, only, force)
    state_path = recipe.workdir / STATE_FILE
    state = read_json(state_path)
    if not isinstance(state, dict) or not isinstance(state.get("nodes"), dict):
        state = {"version": 1, "nodes": {}}
    state_before = copy.deepcopy(state) if state_path.is_file() else None
    records: dict[str, NodeRecord] = {}
    results: dict[str, StageResult] = {}
    for node in recipe:
        r = res[node.name]
        records[node.name] = NodeRecord(node.name, node.type, r.key, "pending", list(node.deps),
                                        r.out_dir, r.model_dir)
    todo: list[str] = []
    for node in recipe:
        r, rec = res[node.name], records[node.name]
        m = _marker(r)
        if r.local:
            rec.status = "cached"
        elif m is not None and node.name not in force:
            rec.status = "cached"
            sr = _result_from_marker(r, m)
            results[node.name] = sr
            rec.model_dir = r.model_dir = sr.model_dir or rec.model_dir
            rec.seconds = m.get("seconds")
            rec.metrics, rec.artifacts = sr.metrics, sr.artifacts
        elif node.name in sel:
            todo.append(node.name)
        if rec.status == "cached":
            state["nodes"][node.name] = {"key": r.key, "material": r.material}
    failure: BaseException | None = None
    try:
        if not todo:
            log.info("nothing to do: all %d nodes are cached", len(records))
        overall_cm = (progress.task("apply " + recipe.name, total=len(todo), unit="node") if todo
                      else contextlib.nullcontext(_NULL_TASK))
        with overall_cm as overall:
            for name in todo:
                node, r, rec = recipe.nodes[name], res[name], records[name]
                missing = [d for d in node.deps if records[d].status not in ("cached", "ran")]
                if missing:
                    continue  # an input failed or was not selected
                overall.update(info=name)
                progress.log(f"[bold]{name}[/] ({node.type}): running → {r.out_dir}")
                log.info("node %s (%s) key %s: running in %s", name, node.type, r.key, r.out_dir)
                t1 = time.monotonic()
                try:
                    sr = _run_node(recipe, node, r, res, results, force=name in force, progress=progress)
                except BaseException as e:
                    rec.status = "failed"
                    rec.seconds = time.monotonic() - t1
                    rec.error = f"{type(e).__name__}: {e}"
                    log.exception("node %s failed", name)
                    raise
                rec.seconds = time.monotonic() - t1
                rec.status = "ran"
                results[name] = sr
                rec.model_dir = r.model_dir = sr.model_dir or rec.model_dir
                rec.metrics, rec.artifacts = sr.metrics, sr.artifacts
                state["nodes"][name] = {"key": r.key, "material": r.material}
                write_json_atomic(state_path, state)
                log.info("node %s done in %.2f s", name, rec.seconds)
                overall.update(advance=1)
        doc = lock_document(recipe, res)  # hub datasets add their files once downloaded
        if locked:
            diffs = compare_lock(lock, doc, recipe.lock_path)
            if diffs:
                raise LockMismatchError(_lock_msg(recipe, diffs))
        elif write_lock:
            lock_written = _update_lock(recipe, lock, doc) or lock_written
    except BaseException as e:
        failure = e
        raise
    finally:
        if state != state_before:
            write_json_atomic(state_path, state)
        result = ApplyResult(recipe.name, recipe.workdir, [records[n] for n in recipe.order], started,
                             _now(), time.monotonic() - t0, lock_written=lock_written, log_file=logfile)
        if result.ran or failure is not None or not _run_record_current(recipe.workdir, result):
            _write_run(recipe, result)
            try:
                result.report = _report(recipe.workdir)
            except Exception:  # a report must never hide the outcome of the build
                log.exception("writing the report failed")
        else:
            result.report = _existing_report(recipe.workdir)
    if failure is None and not result.ran:
        log.info("nothing ran; %s", "lockfile updated" if lock_written else "lockfile unchanged")
    return result


def _run_node(recipe: Recipe, node: Node, r: Resolved, res: Mapping[str, Resolved],
              results: Mapping[str, StageResult], *, force: bool, progress: Progress) -> StageResult:
    from finrecipe import sources

    assert r.out_dir is not None
    if force and r.out_dir.exists():
        shutil.rmtree(r.out_dir)
    r.out_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    t1 = time.monotonic()
    if node.model is not None:
        spec = node.model
        dest = r.out_dir / "model"
        if spec.hub is not None:
            sources.fetch_hub_model(node.name, spec.hub, r.material["commit"], dest,
                                    allow_pickle=spec.allow_pickle)
        else:
            assert spec.init is not None
            tok_dir: Path | None = None
            if spec.init.tokenizer is not None:
                if spec.init.tokenizer in recipe.nodes:
                    tok_dir = res[spec.init.tokenizer].model_dir
                else:
                    tok_dir = (recipe.loaded.base_dir(("models", node.name, "init", "tokenizer"))
                               / spec.init.tokenizer).absolute()
            sources.build_init_model(spec.init.config, seed=spec.init.seed, dtype=spec.init.dtype,
                                     dest=dest, tokenizer_dir=tok_dir, progress=progress)
        sr = StageResult(model_dir=dest)
    elif node.dataset is not None:
        spec_d = node.dataset
        assert spec_d.hub is not None
        files = sources.fetch_hub_dataset(spec_d.hub, r.material["commit"], r.out_dir / "data",
                                          spec_d.patterns)
        shas = ShaCache(None)
        listed = []
        for f in files:
            sha, size = shas.sha256(f)
            listed.append({"path": _rel(f, r.out_dir / "data"), "size": size, "sha256": sha})
        _attach_hub_dataset(recipe, node, r, listed)
        extra["dataset_files"] = listed
        sr = StageResult()
    else:
        assert node.kind is not None and node.config is not None
        ctx = StageContext(node=node.name, workdir=recipe.workdir, cache_dir=recipe.workdir / ".cache",
                           progress=progress, logger=logging.getLogger(f"finrecipe.stages.{node.type}"),
                           recipe_dir=recipe.stage_dir(node.name))
        try:
            sr = node.kind.run(node.config, _input_refs(recipe, node, res), r.out_dir, ctx)
        except (FinrecipeError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise StageError(f"stage {node.name!r} ({node.type}) failed: {type(e).__name__}: {e} "
                             f"(details in {recipe.workdir / 'logs'})") from e
        if not isinstance(sr, StageResult):
            raise StageError(f"stage {node.name!r} ({node.type}) returned {type(sr).__name__}, "
                             "not a StageResult")
        if node.kind.produces_model and (sr.model_dir is None or not Path(sr.model_dir).is_dir()):
            raise StageError(f"stage {node.name!r} ({node.type}) reported no model directory "
                             f"(got {sr.model_dir}); expected {r.out_dir / 'model'}")
    result_json = sr.to_json()
    if sr.model_dir is not None:
        md = Path(sr.model_dir).absolute()
        with contextlib.suppress(ValueError):
            result_json["model_dir"] = md.relative_to(r.out_dir.absolute()).as_posix()
    marker = {"node": node.name, "type": node.type, "key": r.key, "finished": _now(),
              "seconds": round(time.monotonic() - t1, 3), "finrecipe_version": __version__,
              "material": r.material, "result": result_json, **extra}
    write_json_atomic(r.out_dir / MARKER, marker)  # last: the node is done only now
    return sr


# ---------------------------------------------------------------------------- run record + report

def _write_run(recipe: Recipe, result: ApplyResult) -> None:
    from finrecipe.recipe.cache import sha256_file

    rec = {"recipe": {"name": recipe.name, "file": str(recipe.file), "sha256": sha256_file(recipe.file)},
           "finrecipe_version": __version__, "started": result.started, "finished": result.finished,
           "nodes": [n.to_json() for n in result.nodes]}
    write_json_atomic(recipe.workdir / RUN_FILE, rec)


def _run_record_current(workdir: Path, result: ApplyResult) -> bool:
    """Whether run.json already describes this (fully built, unchanged) state of the recipe."""
    prev = read_json(workdir / RUN_FILE)
    if not isinstance(prev, dict) or not isinstance(prev.get("nodes"), list):
        return False
    old = {n.get("name"): (n.get("key"), n.get("status")) for n in prev["nodes"] if isinstance(n, dict)}
    return len(old) == len(result.nodes) and all(
        n.name in old and old[n.name][0] == n.key and old[n.name][1] in ("ran", "cached")
        and n.status == "cached" for n in result.nodes)


def _report(workdir: Path) -> Path | None:
    """`finrecipe.report.build_report(workdir)` when that package exists, else the basic report."""
    build = None
    try:
        import finrecipe.report as rep

        build = getattr(rep, "build_report", None)
    except ImportError:
        build = None
    if build is not None:
        try:
            out = build(workdir)
            return Path(out) if isinstance(out, (str, Path)) else workdir / "report.md"
        except Exception:
            log.exception("finrecipe.report.build_report failed; writing the basic report instead")
    from finrecipe.recipe.report_basic import build_report

    return build_report(workdir)


def _existing_report(workdir: Path) -> Path | None:
    p = workdir / "report.md"
    return p if p.is_file() else None
