"""`finrecipe merge CONFIG OUT_DIR` and `finrecipe inspect MODEL_DIR`: presentation only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from finrecipe.util.fmt import human_bytes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524288000, '1234' -> 1234."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    n = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if n < 1:
        raise ValueError(f"{text!r}: the size must be at least one byte")
    return int(n)


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker threads (0 = all cores). More than the machine's cores is capped at the "
                   "number of cores unless --force-threads is given.")
@click.option("--force-threads", is_flag=True,
              help="Use --threads as given even when it exceeds the number of cores (at most 1024).")
@click.option("--out-shard-size", type=_Size(), default="5GB", show_default=True,
              help="Largest output shard: 5GB, 500MB, 2GiB or bytes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomised methods (DARE).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT_DIR if it exists. Without it an existing OUT_DIR is an error (exit 1), "
                   "also when another merge creates it while this one runs: the first to finish wins "
                   "and nothing is replaced.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge_cmd(config: Path, out_dir: Path, threads: int, force_threads: bool, out_shard_size: int, seed: int,
              overwrite: bool, quiet: bool) -> None:
    """Merge models as described by a mergekit YAML CONFIG into OUT_DIR (a Hugging Face model).

    OUT_DIR appears complete or not at all: the merge writes into a hidden directory beside it and
    renames it into place; the hidden directory of a killed merge is removed by the next merge to
    the same OUT_DIR. Exit codes: 0 done, 2 bad input (config, model files), 1 failure (OUT_DIR
    exists, disk full, ...), 130 interrupted."""
    from finrecipe.merge import load_merge_config, run_merge

    cfg = load_merge_config(config)
    if quiet:  # no bars: rich is not even imported (a quiet merge's start-up time is part of its cost)
        from finrecipe.progress import NullProgress

        res = run_merge(cfg, out_dir, threads=threads, out_shard_size=out_shard_size, seed=seed,
                        overwrite=overwrite, progress=NullProgress(), force_threads=force_threads)
    else:
        from finrecipe.cli.ui import RichProgress

        with RichProgress() as progress:
            res = run_merge(cfg, out_dir, threads=threads, out_shard_size=out_shard_size, seed=seed,
                            overwrite=overwrite, progress=progress, force_threads=force_threads)
    if res.notes:
        from finrecipe.cli.ui import console_err

        for note in res.notes:
            console_err().print(f"[yellow]note[/] {note}")
    rate = res.total_bytes / res.seconds if res.seconds > 0 else 0.0
    if not quiet:
        from finrecipe.cli.ui import console_err

        console_err().print(
            f"[green]merged[/] {res.method}: {res.tensors} tensors, {human_bytes(res.total_bytes, 2)} "
            f"in {res.seconds:.1f}s ({human_bytes(rate, 2)}/s) -> {res.out_dir}")


@click.command("inspect")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", type=click.IntRange(min=0), default=0,
              help="Show at most this many tensors in the table (0 = all).")
def inspect_cmd(model_dir: Path, as_json: bool, limit: int) -> None:
    """Show the tensors (name, dtype, shape), parameter count, shards and size of a model."""
    from rich.table import Table

    from finrecipe.cli.ui import console
    from finrecipe.merge import read_model

    info = read_model(model_dir)
    if as_json:
        click.echo(json.dumps({
            "path": str(info.path), "files": info.files, "num_params": info.num_params,
            "total_bytes": info.total_bytes, "metadata": info.metadata,
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "file": t.file}
                        for t in info.tensors.values()],
        }, indent=2))
        return
    table = Table(title=str(model_dir))
    table.add_column("tensor")
    table.add_column("dtype")
    table.add_column("shape")
    table.add_column("file")
    items = list(info.tensors.values())
    for t in items[:limit] if limit else items:
        table.add_row(t.name, t.dtype, "×".join(map(str, t.shape)) or "scalar", t.file)
    c = console()
    c.print(table)
    if limit and len(items) > limit:
        c.print(f"... {len(items) - limit} more tensors")
    dts: dict[str, int] = {}
    for t in items:
        dts[t.dtype] = dts.get(t.dtype, 0) + t.numel
    c.print(f"{len(items)} tensors, {info.num_params:,} parameters "
            f"({', '.join(f'{k}: {v:,}' for k, v in dts.items())}), {len(info.files)} shard(s), "
            f"{human_bytes(info.total_bytes, 2)}")


COMMANDS = [merge_cmd, inspect_cmd]
