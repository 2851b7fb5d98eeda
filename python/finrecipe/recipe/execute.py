"""`apply`: run every node that is not cached, in order, under the workdir lock.

A node runs into `<workdir>/<node>/<key>/`; its completion marker (DONE.json) is written last, so
an interrupted apply resumes where it stopped. One loop serves every node kind: the engine hands
the kind its config, the outputs of its inputs, its directory and a context, and records the
result; nothing here names a particular kind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finrecipe import __version__
from finrecipe.errors import FinrecipeError, IoError, LockMismatchError, StageError
from finrecipe.progress import NullProgress, Progress
from finrecipe.recipe import lockfile
from finrecipe.recipe.graph import Node, RecipeGraph
from finrecipe.recipe.records import (
    ApplyResult,
    build_report,
    now,
    report_current,
    run_record_current,
    write_run,
    write_state,
)
from finrecipe.recipe.resolve import Resolved, resolve
from finrecipe.recipe.status import (
    MARKER,
    NodeState,
    input_refs,
    last_state,
    node_state,
    output_ref,
)
from finrecipe.types import Grants, StageContext, StageResult
from finrecipe.util.content import ShaCache
from finrecipe.util.fs import clean_stale_temps, sweep_stale_temps, write_json_atomic

log = logging.getLogger("finrecipe.recipe")

SHA_CACHE = ".cache/sha256.json"


@contextlib.contextmanager
def workdir_lock(workdir: Path, name: str = ".apply.lock") -> Iterator[None]:
    """Refuse a second concurrent apply on the same workdir (the OS drops the lock on SIGKILL)."""
    import fcntl

    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise IoError(f"{workdir}: cannot create the workdir: {e.strerror}") from None
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
def log_to(workdir: Path) -> Iterator[Path]:
    logs = workdir / "logs"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = logs / f"apply-{stamp}-{os.getpid()}.log"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        raise IoError(f"{logs}: cannot write the log: {e.strerror or e}") from None
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


def states_for(recipe: RecipeGraph, res: dict[str, Resolved], *, force: frozenset[str] = frozenset(),
               allowed_code: frozenset[str] | None = None, last: dict[str, Any] | None = None
               ) -> dict[str, NodeState]:
    """Every node's state before anything runs (what plan, dry-run and apply all start from);
    `last`: the key of each node's last build (default: read from `<workdir>/state.json`)."""
    last = last_state(recipe) if last is None else last
    return {node.name: node_state(recipe, node, res[node.name], last, allowed_code=allowed_code,
                                  force=node.name in force) for node in recipe}


def node_context(recipe: RecipeGraph, node: Node, r: Resolved, progress: Progress, grants: Grants
                 ) -> StageContext:
    """What a running node gets besides its config and inputs."""
    return StageContext(node=node.name, workdir=recipe.workdir, cache_dir=recipe.workdir / ".cache",
                        progress=progress, logger=logging.getLogger(f"finrecipe.stages.{node.kind.type}"),
                        recipe_dir=recipe.base_dir(node.name), material=r.material, facts=r.facts,
                        grants=grants)


def selection(recipe: RecipeGraph, only: list[str]) -> set[str]:
    return set(recipe.ancestors(only)) if only else set(recipe.order)


def dry_run(recipe: RecipeGraph, *, only: list[str], force: list[str], locked: bool,
            grants: Grants | None = None) -> ApplyResult:
    allowed_code = grants.remote_code if grants is not None else None
    t0, started = time.monotonic(), now()
    shas = ShaCache(recipe.workdir / SHA_CACHE)  # read, never saved: a dry run writes nothing
    lock = lockfile.load_lock(recipe)
    res = resolve(recipe, shas=shas, lock=lock)
    states = states_for(recipe, res, force=frozenset(force), allowed_code=allowed_code)
    if locked:
        diffs = lockfile.compare_lock(lock, lockfile.lock_document(recipe, lock_entries(recipe, res, states)),
                                      recipe.lock_path)
        if diffs:
            raise LockMismatchError(lockfile.mismatch_message(recipe, diffs))
    sel = selection(recipe, only)
    would_run = [n for n, st in states.items() if not st.done and n in sel]
    for st in states.values():
        st.status = "cached" if st.done else "pending"
    return ApplyResult(recipe.name, recipe.workdir, [states[n] for n in recipe.order], started, now(),
                       time.monotonic() - t0, dry_run=True, would_run=would_run)


def lock_entries(recipe: RecipeGraph, res: dict[str, Resolved], states: dict[str, NodeState]
                  ) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for node in recipe:
        r = res[node.name]
        st = states.get(node.name)
        out[node.name] = node.kind.lock_entry(node.config, r.as_resolution(), st.result if st else None)
    return out


def apply(recipe: RecipeGraph, *, only: list[str], force: list[str], locked: bool,
          progress: Progress | None = None, write_lock: bool = True, grants: Grants | None = None
          ) -> ApplyResult:
    """Run what is not cached. The caller has checked `grants` against the recipe's requests."""
    progress = progress or NullProgress()
    grants = grants or Grants()
    rank = worker_rank(recipe)
    if rank:
        return _apply_worker(recipe, rank, progress, grants)
    with workdir_lock(recipe.workdir), log_to(recipe.workdir) as logfile:
        log.info("apply %s (%s), finrecipe %s", recipe.name, recipe.file, __version__)
        for p in sweep_stale_temps(recipe.workdir):
            log.info("removed %s, left by an interrupted run", p)
        return _apply_locked(recipe, only, force, locked, progress, logfile, write_lock, grants)


def _apply_locked(recipe: RecipeGraph, only: list[str], force: list[str], locked: bool, progress: Progress,
                  logfile: Path, write_lock: bool, grants: Grants) -> ApplyResult:
    allowed_code = grants.remote_code
    t0, started = time.monotonic(), now()
    shas = ShaCache(recipe.workdir / SHA_CACHE)
    lock = lockfile.load_lock(recipe)
    res = resolve(recipe, shas=shas, lock=lock)
    shas.save()
    prev_state = last_state(recipe)
    states = states_for(recipe, res, force=frozenset(force), allowed_code=allowed_code, last=prev_state)
    doc = lockfile.lock_document(recipe, lock_entries(recipe, res, states))
    if locked:
        diffs = lockfile.compare_lock(lock, doc, recipe.lock_path)
        if diffs:
            log.error("lock mismatch: %s", diffs)
            raise LockMismatchError(lockfile.mismatch_message(recipe, diffs))
    lock_written = False
    if not locked and write_lock:
        lock_written = lockfile.update_lock(recipe, lock, doc)
        lock = doc if lock_written else lock
    sel = selection(recipe, only)
    state: dict[str, Any] = dict(prev_state)
    todo: list[str] = []
    for name, st in states.items():
        if st.done:
            st.status = "cached"  # (an apply reports local sources as cached)
            state[name] = {"key": res[name].key, "material": res[name].material}
        else:
            st.status = "pending"
            if name in sel:
                todo.append(name)
    failure: BaseException | None = None
    try:
        if not todo:
            log.info("nothing to do: all %d nodes are cached", len(states))
        overall_cm = (progress.task("apply " + recipe.name, total=len(todo), unit="node") if todo
                      else contextlib.nullcontext(NullProgress().task("")))
        with overall_cm as overall:
            for name in todo:
                node, r, st = recipe.nodes[name], res[name], states[name]
                if any(not states[d].done for d in node.deps):
                    continue  # an input failed or was not selected
                overall.update(info=name)
                progress.log(f"[bold]{name}[/] ({node.type}): running → {r.out_dir}")
                log.info("node %s (%s) key %s: running in %s", name, node.type, r.key, r.out_dir)
                t1 = time.monotonic()
                try:
                    result = run_node(recipe, node, r, states, force=name in force, progress=progress,
                                      grants=grants)
                except BaseException as e:
                    st.status = "failed"
                    st.seconds = time.monotonic() - t1
                    st.error = f"{type(e).__name__}: {e}"
                    log.exception("node %s failed", name)
                    raise
                st.seconds = time.monotonic() - t1
                st.status = "ran"
                st.result = result
                st.model_dir = result.model_dir or st.model_dir
                st.output = output_ref(recipe, node, r, result, allowed_code)
                state[name] = {"key": r.key, "material": r.material}
                write_state(recipe, state)
                log.info("node %s done in %.2f s", name, st.seconds)
                overall.update(advance=1)
        doc = lockfile.lock_document(recipe, lock_entries(recipe, res, states))  # hub datasets add files
        if locked:
            diffs = lockfile.compare_lock(lock, doc, recipe.lock_path)
            if diffs:
                raise LockMismatchError(lockfile.mismatch_message(recipe, diffs))
        elif write_lock:
            lock_written = lockfile.update_lock(recipe, lock, doc) or lock_written
    except BaseException as e:
        failure = e
        raise
    finally:
        if state != prev_state or not (recipe.workdir / "state.json").is_file():
            write_state(recipe, state)
        result_ = ApplyResult(recipe.name, recipe.workdir, [states[n] for n in recipe.order], started,
                              now(), time.monotonic() - t0, lock_written=lock_written, log_file=logfile)
        if result_.ran or failure is not None or not run_record_current(recipe.workdir, result_):
            write_run(recipe, result_)
            result_.report = build_report(recipe.workdir)
        else:
            result_.report = report_current(recipe.workdir) or build_report(recipe.workdir)
    if failure is None and not result_.ran:
        log.info("nothing ran; %s", "lockfile updated" if lock_written else "lockfile unchanged")
    return result_


def worker_rank(recipe: RecipeGraph) -> int:
    """This machine's rank in the recipe's multi-node jobs (0 when it has none, or is rank 0)."""
    ranks = {r for n in recipe if (r := n.kind.node_rank(n.config)) is not None}
    if len(ranks) > 1:
        raise FinrecipeError(f"{recipe.file.name}: the multi-node stages disagree on this machine's node "
                             f"rank ({sorted(ranks)}); set it once with --node-rank")
    return ranks.pop() if ranks else 0


def _apply_worker(recipe: RecipeGraph, rank: int, progress: Progress, grants: Grants) -> ApplyResult:
    """`apply` on a machine of rank > 0 of a multi-node job (the workdir on shared storage): run the
    multi-node stages only — each waits for its inputs, which rank 0 builds — and write no marker,
    record, lockfile or report: rank 0 does, once the job (which waits for every rank) is done."""
    t0, started = time.monotonic(), now()
    poll_seconds = float(os.environ.get("FINRECIPE_WORKER_POLL_SECONDS", "5"))
    # a lock per rank: rank 0's apply holds the workdir's own lock at the same time
    with workdir_lock(recipe.workdir, name=f".apply.node{rank}.lock"), log_to(recipe.workdir) as logfile:
        log.info("apply %s on node rank %d (multi-node stages only)", recipe.name, rank)
        res = resolve(recipe, shas=ShaCache(recipe.workdir / SHA_CACHE), lock=lockfile.load_lock(recipe))
        states = states_for(recipe, res, allowed_code=grants.remote_code)
        for node in recipe:
            st = states[node.name]
            if node.kind.node_rank(node.config) is None or st.done:
                continue
            waited = False
            while True:  # the inputs are rank 0's to build
                for d in node.deps:
                    if not states[d].done:
                        states[d] = node_state(recipe, recipe.nodes[d], res[d], {},
                                               allowed_code=grants.remote_code)
                missing = [d for d in node.deps if not states[d].done]
                if not missing:
                    break
                if not waited:
                    progress.log(f"{node.name}: waiting for rank 0 to build {', '.join(missing)}")
                    waited = True
                time.sleep(poll_seconds)
            progress.log(f"[bold]{node.name}[/] ({node.type}): node rank {rank} joins → {res[node.name].out_dir}")
            t1 = time.monotonic()
            out_dir = res[node.name].out_dir
            assert out_dir is not None
            out_dir.mkdir(parents=True, exist_ok=True)
            node.kind.run(node.config, input_refs(node, states), out_dir,
                          node_context(recipe, node, res[node.name], progress, grants))
            st.status, st.seconds = "ran", time.monotonic() - t1
        for st in states.values():
            if st.status == "local":
                st.status = "cached"
            elif st.status not in ("cached", "ran"):
                st.status = "pending"
        return ApplyResult(recipe.name, recipe.workdir, [states[n] for n in recipe.order], started, now(),
                           time.monotonic() - t0, log_file=logfile)


def run_node(recipe: RecipeGraph, node: Node, r: Resolved, states: dict[str, NodeState], *, force: bool,
             progress: Progress, grants: Grants | None = None) -> StageResult:
    """Run one node into its directory and write its marker (last)."""
    assert r.out_dir is not None
    if force and r.out_dir.exists():
        shutil.rmtree(r.out_dir)
    try:
        r.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IoError(f"{r.out_dir}: cannot create the node's directory: {e.strerror}") from None
    clean_stale_temps(r.out_dir / "model")
    t1 = time.monotonic()
    ctx = node_context(recipe, node, r, progress, grants or Grants())
    try:
        sr = node.kind.run(node.config, input_refs(node, states), r.out_dir, ctx)
    except (FinrecipeError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise StageError(f"{node.section[:-1] if node.section != 'stages' else 'stage'} {node.name!r} "
                         f"({node.type}) failed: {type(e).__name__}: {e} "
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
    marker = {"node": node.name, "type": node.type, "key": r.key, "finished": now(),
              "seconds": round(time.monotonic() - t1, 3), "finrecipe_version": __version__,
              "material": r.material, "result": result_json, **sr.extra}
    write_json_atomic(r.out_dir / MARKER, marker)  # last: the node is done only now
    return sr
