"""`finrecipe validate | plan | apply | lock RECIPE`: presentation only (the logic is finrecipe.recipe)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from finrecipe.util.fmt import human_bytes, seconds

if TYPE_CHECKING:
    from finrecipe.recipe.records import ApplyResult

_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a recipe field (value parsed as YAML), e.g. --set stages.cpt.optimizer.lr=1e-6. "
         "Repeatable.")
_recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))


def _grant_options(f: Any) -> Any:
    """--allow-remote-code / --allow-judge / --allow-path / --judge-key-env: what the person running
    the command allows a (possibly shared) recipe to do."""
    f = click.option("--judge-key-env", metavar="VAR", default=None,
                     help="Read a judge endpoint's API key from environment variable VAR (a recipe "
                          "cannot choose which variable is sent).")(f)
    f = click.option("--allow-path", "allow_paths", multiple=True, metavar="DIR",
                     help="Let the recipe read or write under DIR, outside its own directories "
                          "(absolute model paths, data elsewhere, a workdir elsewhere). Repeatable.")(f)
    f = click.option("--allow-judge", "allow_hosts", multiple=True, metavar="HOST",
                     help="Let the recipe send prompts and answers to the judge endpoint on HOST. "
                          "Repeatable.")(f)
    f = click.option("--allow-remote-code", "allow_code", multiple=True, metavar="NAME",
                     help="Let source NAME load with its own Python code (trust_remote_code: true in "
                          "the recipe alone has no effect). Repeatable; '*' allows every source.")(f)
    return f


def _grants(allow_code: tuple[str, ...], allow_hosts: tuple[str, ...], allow_paths: tuple[str, ...],
            judge_key_env: str | None) -> Any:
    from finrecipe.types import Grants

    return Grants.from_env(remote_code=allow_code, hosts=allow_hosts, paths=allow_paths,
                           judge_key_env=judge_key_env)


def _lock_file_option(help: str) -> Any:
    return click.option("--lock-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        metavar="PATH", help=help)


def _short_path(p: Any) -> str:
    if not p:
        return "—"
    try:
        return str(Path(p).relative_to(Path.cwd()))
    except ValueError:
        return str(p)


@click.command("validate")
@_recipe_arg
@_set_option
def validate_cmd(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE without running or downloading anything: schema, references, cycles, that local
    model directories, tokenizers and dataset files exist, and each stage's config against its input
    models when they are all local directories (e.g. a merge against the safetensors headers)."""
    from finrecipe.cli.ui import console
    from finrecipe.recipe import load_recipe

    r = load_recipe(recipe, overrides=list(overrides))
    notes = r.validate()
    counts = {s: sum(1 for n in r if n.section == s) for s in ("models", "datasets", "stages")}
    console().print(f"[green]ok[/] {r.name}: {counts['models']} models, {counts['datasets']} datasets, "
                    f"{counts['stages']} stages; order: {' → '.join(r.order)}")
    for n in notes:
        console().print(f"  checked: {n}")


_STATUS_STYLE = {"cached": "green", "local": "green", "stale": "yellow", "to run": "cyan"}


@click.command("plan")
@_recipe_arg
@_set_option
@_lock_file_option("Lockfile to read pinned hub commits from, instead of RECIPE.lock beside the recipe.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_grant_options
def plan_cmd(recipe: Path, overrides: tuple[str, ...], lock_file: Path | None, as_json: bool,
             allow_code: tuple[str, ...], allow_hosts: tuple[str, ...], allow_paths: tuple[str, ...],
             judge_key_env: str | None) -> None:
    """Show the nodes of RECIPE in execution order with each one's status (local, cached, stale and
    why, or to run), its cache key, inputs and output size (measured when cached, else estimated).

    Hub revisions are resolved from the lockfile when it pins them, else on the hub; a revision that
    cannot be resolved offline leaves its node (and what depends on it) unresolved."""
    from finrecipe.recipe import load_recipe

    r = load_recipe(recipe, overrides=list(overrides), lock_file=lock_file)
    plan = r.plan(grants=_grants(allow_code, allow_hosts, allow_paths, judge_key_env))
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
        return
    from rich.table import Table

    from finrecipe.cli.ui import console

    t = Table(title=f"plan: {plan.recipe}  (workdir {_short_path(plan.workdir)})", title_justify="left")
    for col in ("#", "node", "type", "key", "status", "inputs", "size"):
        t.add_column(col, justify="right" if col in ("#", "size") else "left")
    for i, n in enumerate(plan.nodes, 1):
        style = _STATUS_STYLE.get(n.status, "")
        status = f"[{style}]{n.status}[/]" if style else n.status
        if n.reasons:
            status += ": " + "; ".join(n.reasons[:3]) + (" ..." if len(n.reasons) > 3 else "")
        if n.partial:
            status += " (resumes)"
        t.add_row(str(i), n.name, n.type, n.key[:8], status, ", ".join(n.inputs) or "—",
                  human_bytes(n.estimated_bytes) if n.estimated_bytes is not None else "?")
    console().print(t)
    todo = plan.to_run
    console().print(f"{len(todo)} to run" + (f": {', '.join(todo)}" if todo else " (nothing to do)"))
    if plan.requests:
        from rich.markup import escape

        console().print("the recipe asks for (a recipe alone cannot allow these):")
        for req, ok in plan.requests:
            mark = "[green]granted[/]" if ok else f"[yellow]not granted[/]: {escape(req.option)}"
            console().print(f"  - {escape(req.why)} — {mark}")


@click.command("apply")
@_recipe_arg
@_set_option
@click.option("--only", multiple=True, metavar="NODE",
              help="Build only NODE (and whatever it needs that is missing). Repeatable.")
@click.option("--force", multiple=True, metavar="NODE",
              help="Rebuild NODE even if cached (its dependents keep their cache: their keys do not "
                   "change). Repeatable.")
@click.option("--dry-run", is_flag=True, help="Show what would run; run nothing.")
@click.option("--locked", is_flag=True,
              help="Refuse to run if there is no lockfile or anything resolves differently from it; "
                   "never write it.")
@_lock_file_option("Lockfile to read and write instead of RECIPE.lock beside the recipe.")
@click.option("--no-lock", is_flag=True,
              help="Do not write the lockfile (it is still read for pinned hub commits and --locked).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bars (a line still says when each node starts).")
@click.option("--node-rank", type=click.IntRange(min=0), default=None,
              help="This machine's rank in the recipe's multi-node training (launch.nnodes > 1); run "
                   "the same apply on every machine, on a workdir they share. Rank 0 builds "
                   "everything; other ranks join the multi-node stages only.")
@click.option("--master-addr", default=None, metavar="HOST", help="Rank 0's address for torchrun.")
@click.option("--master-port", type=click.IntRange(1, 65535), default=None, help="Rank 0's port for torchrun.")
@_grant_options
def apply_cmd(recipe: Path, overrides: tuple[str, ...], only: tuple[str, ...], force: tuple[str, ...],
              dry_run: bool, locked: bool, lock_file: Path | None, no_lock: bool, quiet: bool,
              node_rank: int | None, master_addr: str | None, master_port: int | None,
              allow_code: tuple[str, ...], allow_hosts: tuple[str, ...], allow_paths: tuple[str, ...],
              judge_key_env: str | None) -> None:
    """Build what RECIPE describes: run every node that is not cached, in dependency order.

    Outputs go to <workdir>/<node>/<key>/ (workdir defaults to runs/<name> beside the recipe); a
    node counts as done once its DONE.json is written, so an interrupted apply continues where it
    stopped. Prints a summary of the nodes, then the scores of the evaluate stages and the path of
    the HTML report (<workdir>/report.html; report.md, report.json and logs/ are beside it); a
    re-apply with nothing to do prints the same scores from the cache. RECIPE.lock is rewritten
    when what the recipe resolves to changed, unless --locked or --no-lock is given."""
    import os

    from finrecipe.cli.ui import console, console_err, progress_for
    from finrecipe.recipe import load_recipe

    for var, val in (("FINRECIPE_NODE_RANK", node_rank), ("FINRECIPE_MASTER_ADDR", master_addr),
                     ("FINRECIPE_MASTER_PORT", master_port)):
        if val is not None:  # per-node runtime settings: outside the cache key (docs/training.md)
            os.environ[var] = str(val)
    r = load_recipe(recipe, overrides=list(overrides), lock_file=lock_file)
    grants = _grants(allow_code, allow_hosts, allow_paths, judge_key_env)
    if dry_run:
        res = r.apply(only=list(only), force=list(force), dry_run=True, locked=locked,
                      write_lock=not no_lock, grants=grants)
        todo = res.would_run
        console().print(f"dry run: {len(todo)} would run" + (f": {', '.join(todo)}" if todo else "")
                        + f"; {len(res.cached)} cached")
        return
    with progress_for(quiet=quiet) as progress:
        res = r.apply(only=list(only), force=list(force), locked=locked, progress=progress,
                      write_lock=not no_lock, grants=grants)
    if res.noop:
        console().print(f"[green]nothing to do[/]: all {len(res.nodes)} nodes of {r.name} are cached "
                        f"({res.seconds:.2f}s)")
        _print_results(res)
        return
    from rich.table import Table

    t = Table(title=f"apply: {r.name}", title_justify="left")
    for col in ("node", "type", "status", "time", "output"):
        t.add_column(col, justify="right" if col == "time" else "left")
    style = {"ran": "cyan", "cached": "green", "failed": "red", "pending": "yellow"}
    for n in res.nodes:
        st = n.status if n.status != "cached" else ("local" if n.out_dir is None else "reused")
        t.add_row(n.name, n.type, f"[{style[n.status]}]{st}[/]",
                  seconds(n.seconds, sep="") if n.status == "ran" else "—",
                  _short_path(n.model_dir or n.out_dir))
    console().print(t)
    extra = []
    if res.report:
        extra.append(f"report {_short_path(res.report)}")
    if res.lock_written:
        extra.append(f"lockfile {_short_path(r.lock_path)} updated")
    console_err().print(f"ran {len(res.ran)}, reused {len(res.cached)} in {res.seconds:.1f}s"
                        + (f"; {'; '.join(extra)}" if extra else ""))
    _print_results(res)


def _print_results(res: ApplyResult) -> None:
    """The models × tasks table of every evaluate node (the report's table), then the HTML report."""
    from rich.markup import escape
    from rich.table import Table

    from finrecipe.cli.ui import console
    from finrecipe.report import eval_notes, eval_tables  # the report's table: same cells, same order

    for n in res.evaluations:
        header, rows, marks, _deltas = eval_tables(n.metrics)
        t = Table(title=f"results: {n.name}", title_justify="left")
        for i, h in enumerate(header):
            # "custom:finance_qa" → two header lines, so that 80 columns show whole task names
            t.add_column(h.replace(":", ":\n", 1), justify="left" if i == 0 else "right")
        for row, mark in zip(rows, marks, strict=True):
            t.add_row(*[f"[bold]{escape(c)}[/]" if m else escape(c) for c, m in zip(row, mark, strict=True)])
        console().print(t)
        note = eval_notes(n.metrics)
        console().print("[dim]" + "; ".join(note) + "[/]")
        an = n.metrics.get("analysis")
        if not isinstance(an, dict):
            continue
        pairs = [p for p in (an.get("pairs") or []) if isinstance(p, dict)]
        if pairs:
            cos = ", ".join(f"{p.get('a')} × {p.get('b')} "
                            + ("—" if p.get("cosine") is None else f"{p['cosine']:.4f}") for p in pairs)
            console().print(escape(f"task-vector cosine (base {an.get('base')}): {cos}"))
    if res.report_html is not None:
        console().print(f"report: {_short_path(res.report_html)}", soft_wrap=True)  # one line: copyable


@click.command("lock")
@_recipe_arg
@_set_option
@_lock_file_option("Write the lockfile to PATH instead of RECIPE.lock beside the recipe.")
def lock_cmd(recipe: Path, overrides: tuple[str, ...], lock_file: Path | None) -> None:
    """Resolve RECIPE's sources and write RECIPE.lock: hub revisions to commits (always asking the
    hub), local dataset files to sizes and sha256, local model directories to a content digest.
    Builds nothing; hub datasets get their file list once `apply` has downloaded them."""
    from finrecipe.cli.ui import console
    from finrecipe.recipe import load_recipe

    r = load_recipe(recipe, overrides=list(overrides), lock_file=lock_file)
    path = r.lock()
    console().print(f"[green]wrote[/] {_short_path(path)}")


@click.command("clean")
@_recipe_arg
@_set_option
@click.option("--unfinished", is_flag=True,
              help="Also remove node directories that never finished (their partial work is lost; "
                   "apply would have resumed from it).")
@click.option("--unused", is_flag=True,
              help="Also remove finished outputs of older versions of the recipe (keys it no longer "
                   "resolves to).")
def clean_cmd(recipe: Path, overrides: tuple[str, ...], unfinished: bool, unused: bool) -> None:
    """Remove what interrupted runs left in RECIPE's workdir: temporary files and directories of
    killed merges, trainings and report writes (apply also does this when it starts). Refused while
    an apply runs on the same workdir."""
    from finrecipe.cli.ui import console
    from finrecipe.recipe import load_recipe

    r = load_recipe(recipe, overrides=list(overrides))
    removed = r.clean(unfinished=unfinished, unused=unused)
    for p in removed:
        console().print(f"removed {_short_path(p)}")
    console().print(f"[green]clean[/]: {len(removed)} removed from {_short_path(r.workdir)}")


COMMANDS = [validate_cmd, plan_cmd, apply_cmd, lock_cmd, clean_cmd]
