"""`finrecipe convert MODEL_DIR OUT_DIR`: pickle-only weights to safetensors (presentation only)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("convert")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def convert_cmd(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Convert a model directory whose weights are pickles (pytorch_model.bin, or sharded .bin files
    with pytorch_model.bin.index.json) into OUT_DIR with safetensors weights: the same tensor
    names, dtypes and shards, the index rewritten, config and tokenizer files copied.

    Shards are read with torch.load(weights_only=True), so no code from the files runs; a shard
    holding anything but tensors is refused. OUT_DIR appears complete or not at all."""
    from finrecipe.cli.ui import console, console_err
    from finrecipe.sources.convert import convert_pickle_model

    def on_shard(name: str) -> None:
        console_err().print(f"converting {name}")

    dest = convert_pickle_model(model_dir, out_dir, overwrite=overwrite, on_shard=on_shard)
    n = len(list(dest.glob("*.safetensors")))
    console().print(f"[green]wrote[/] {dest} ({n} safetensors shard{'s' if n != 1 else ''})")


COMMANDS = [convert_cmd]
