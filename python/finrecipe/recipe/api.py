"""The public API of the recipe engine: `load_recipe`, and `validate`, `plan`, `apply` and `lock`
on the loaded `Recipe`. The CLI and Python users both call these.

    recipe = finrecipe.load_recipe("recipes/merge_tiny.yaml", overrides=["stages.m.t=0.3"])
    recipe.validate(); print(recipe.plan().to_json()); result = recipe.apply()
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from finrecipe.errors import FinrecipeError, PermissionDenied, RecipeError
from finrecipe.progress import NullProgress, Progress
from finrecipe.recipe import execute, lockfile
from finrecipe.recipe.graph import RecipeGraph, entry_fields
from finrecipe.recipe.loader import apply_override, read_recipe
from finrecipe.recipe.records import ApplyResult, Plan
from finrecipe.recipe.resolve import resolve
from finrecipe.recipe.schema import RecipeSchema
from finrecipe.types import Grants, ModelRef
from finrecipe.util.content import ShaCache


class Recipe(RecipeGraph):
    """A loaded, validated recipe. Build one with `finrecipe.load_recipe(path, overrides=[...])`."""

    def validate(self) -> list[str]:
        """Checks beyond the schema that need no heavy work and write nothing: local paths exist,
        stage configs against the local input models (e.g. a merge against the safetensors
        headers). Returns notes (what was checked)."""
        return validate(self)

    def plan(self, *, grants: Grants | None = None) -> Plan:
        """Each node's status (local, cached, stale and why, to run), key, inputs and size, and what
        the recipe asks the user to allow. Reads the workdir; writes nothing."""
        return plan(self, grants=grants)

    def apply(self, *, only: Sequence[str] | None = None, force: Sequence[str] | None = None,
              dry_run: bool = False, locked: bool = False, progress: Progress | None = None,
              write_lock: bool = True, grants: Grants | None = None) -> ApplyResult:
        """Run every node that is not cached. The lockfile (`self.lock_path`) is read for pinned hub
        commits and for `locked`; it is rewritten when something resolves differently, unless
        `write_lock` is false. Nothing runs unless `grants` (default: `Grants.from_env()`, the
        FINRECIPE_ALLOW_* variables) allows everything the recipe requests (`plan().requests`)."""
        return apply(self, only=only, force=force, dry_run=dry_run, locked=locked, progress=progress,
                     write_lock=write_lock, grants=grants)

    def clean(self, *, unfinished: bool = False, unused: bool = False) -> list[Path]:
        """Remove what interrupted runs left in the workdir (see `clean`)."""
        return clean(self, unfinished=unfinished, unused=unused)

    def lock(self, *, refresh: bool = True) -> Path:
        """Resolve everything (hub commits, dataset hashes) and write RECIPE.lock."""
        return lock(self, refresh=refresh)


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *,
                lock_file: str | Path | None = None) -> Recipe:
    """Read, merge (`extends`), override (`--set`) and validate a recipe file.

    `lock_file`: where the lockfile is read and written (default `<recipe>.lock` beside the recipe).
    """
    loaded = read_recipe(path)
    top = dict(RecipeSchema.model_fields)
    for expr in overrides:
        apply_override(loaded, expr, top_fields=top, entry_fields=entry_fields())
    recipe = Recipe(loaded)
    if lock_file is not None:
        recipe.lock_path = Path(lock_file).absolute()
    return recipe


def validate(recipe: RecipeGraph) -> list[str]:
    notes: list[str] = []
    local: dict[str, ModelRef] = {}
    for node in recipe:
        cc = recipe.check_context(node)
        avail = {d: local[d] for d in node.deps if d in local}
        if len(avail) < len(node.deps):
            continue  # checked against what exists only: an input is built by the recipe
        try:
            note = node.kind.check(node.config, avail, cc)
            ref = node.kind.offline_output(node.name, node.config, cc)
        except RecipeError as e:
            raise recipe.relocate(e) from None
        except FinrecipeError as e:
            raise type(e)(f"{node.section}.{node.name}: {e}") from None
        if isinstance(ref, ModelRef):
            local[node.name] = ref
        if note is None and node.deps:
            note = f"{node.name}: {node.type} config checked against " + ", ".join(sorted(avail))
        if note:
            notes.append(note)
    return notes


def check_grants(recipe: RecipeGraph, grants: Grants) -> None:
    """Refuse (before anything runs) a recipe that asks for what the user did not allow."""
    missing = [r for r in recipe.requests() if not grants.allows(r)]
    if missing:
        raise PermissionDenied(
            f"{recipe.file.name} asks for what a recipe alone cannot allow: "
            + "; ".join(r.describe() for r in missing)
            + ". Read the recipe, then grant what you trust (or set the FINRECIPE_ALLOW_* variables; "
            "docs/security.md)")


def plan(recipe: RecipeGraph, grants: Grants | None = None) -> Plan:
    from finrecipe.recipe.status import estimate

    shas = ShaCache(recipe.workdir / execute.SHA_CACHE)  # read, never saved: plan writes nothing
    res = resolve(recipe, shas=shas, lock=lockfile.load_lock(recipe), allow_unresolved=True)
    states = execute.states_for(recipe, res)
    for node in recipe:  # in order: an estimate may use its inputs' estimates
        states[node.name].estimated_bytes = estimate(recipe, node, states[node.name], states)
    g = grants if grants is not None else Grants.from_env()
    requests = [(r, g.allows(r)) for r in recipe.requests()]
    return Plan(recipe.name, recipe.file, recipe.workdir, [states[n] for n in recipe.order], requests)


def apply(recipe: RecipeGraph, *, only: Sequence[str] | None = None, force: Sequence[str] | None = None,
          dry_run: bool = False, locked: bool = False, progress: Progress | None = None,
          write_lock: bool = True, grants: Grants | None = None) -> ApplyResult:
    only_l, force_l = list(only or []), list(force or [])
    recipe.check_names(only_l, "--only")
    recipe.check_names(force_l, "--force")
    g = grants if grants is not None else Grants.from_env()
    check_grants(recipe, g)
    if dry_run:
        return execute.dry_run(recipe, only=only_l, force=force_l, locked=locked, grants=g)
    return execute.apply(recipe, only=only_l, force=force_l, locked=locked,
                         progress=progress or NullProgress(), write_lock=write_lock, grants=g)


def lock(recipe: RecipeGraph, *, refresh: bool = True) -> Path:
    shas = ShaCache(recipe.workdir / execute.SHA_CACHE)
    res = resolve(recipe, shas=shas, lock=lockfile.load_lock(recipe), refresh=refresh)
    shas.save()
    states = execute.states_for(recipe, res)
    lockfile.write_lock_file(recipe.lock_path,
                             lockfile.lock_document(recipe, execute.lock_entries(recipe, res, states)))
    return recipe.lock_path


def clean(recipe: RecipeGraph, *, unfinished: bool = False, unused: bool = False) -> list[Path]:
    """Remove from the workdir the temporary files of interrupted runs (always); with `unfinished`,
    node directories that never finished (no marker: an interrupted run would have resumed from
    them); with `unused`, finished node directories whose key the recipe no longer resolves to.
    Never while an apply holds the workdir. Returns what was removed."""
    import shutil

    from finrecipe.recipe.status import MARKER
    from finrecipe.util.fs import sweep_stale_temps

    if not recipe.workdir.is_dir():
        return []
    removed: list[Path] = []
    with execute.workdir_lock(recipe.workdir):
        removed.extend(sweep_stale_temps(recipe.workdir))
        if unfinished or unused:
            current = {}
            if unused:
                res = resolve(recipe, shas=ShaCache(recipe.workdir / execute.SHA_CACHE),
                              lock=lockfile.load_lock(recipe), allow_unresolved=True)
                current = {n: r.key for n, r in res.items()}
            for name in recipe.order:
                node_dir = recipe.workdir / name
                if not node_dir.is_dir():
                    continue
                for d in sorted(node_dir.iterdir()):
                    if not d.is_dir() or d.is_symlink():
                        continue
                    done = (d / MARKER).is_file()
                    if (unfinished and not done) or (unused and done and name in current
                                                      and current[name] not in (d.name, "unresolved")):
                        shutil.rmtree(d)
                        removed.append(d)
    return removed
