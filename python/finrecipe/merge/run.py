"""The public merge API: validate a config against the models' headers, then run the merge.

    cfg = load_merge_config("merge.yml")
    info = validate_merge(cfg)                 # cheap: headers only
    res = run_merge(cfg, "out/merged")         # a complete Hugging Face model directory

`model_paths` maps the names used in the config to directories (the recipe engine passes its
resolved models); None means the names are local paths.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError, IoError
from finrecipe.merge.config import MergeConfig
from finrecipe.merge.output import atomic_output_dir
from finrecipe.merge.plan import MergePlanInfo, build_plan
from finrecipe.merge.tokenizer import (
    VOCAB_DIR,
    load_tokenizer,
    resolve_chat_template,
    save_tokenizer,
    write_vocab_inputs,
)
from finrecipe.progress import NullProgress, Progress

log = logging.getLogger("finrecipe.merge")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass
class MergeResult:
    out_dir: Path
    files: list[str]
    total_bytes: int
    tensors: int
    seconds: float
    method: str
    info: MergePlanInfo
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # things the caller may want to show


MAX_THREADS = 1024  # the core refuses more, even when forced


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; cgroup CPU quotas are the core's
    business: it uses Rust's available_parallelism for threads=0)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_threads(threads: int, force: bool = False) -> tuple[int, str | None]:
    """The thread count to use for a requested one (0 = all cores), and a note when it was capped:
    more threads than cores only add memory and contention, so they need `force`."""
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 = all cores), got {threads}")
    cores = available_cores()
    if threads > cores and not force:
        return cores, (f"{threads} threads requested but this machine has {cores} cores: using {cores} "
                       "(--force-threads to use more)")
    if threads > MAX_THREADS:
        raise ConfigError(f"threads: {threads} is more than the limit of {MAX_THREADS}")
    return threads, None


def validate_merge(cfg: MergeConfig, model_paths: Mapping[str, Path | str] | None = None) -> MergePlanInfo:
    """Check `cfg` against the input models' headers and resolve the plan; reads no tensor data."""
    return build_plan(cfg, model_paths)


def run_merge(cfg: MergeConfig, out_dir: str | Path, model_paths: Mapping[str, Path | str] | None = None, *,
              threads: int = 0, out_shard_size: int = 5_000_000_000, seed: int = 0,
              overwrite: bool = False, progress: Progress | None = None,
              force_threads: bool = False) -> MergeResult:
    """Merge into `out_dir` (written atomically; refused if it exists unless `overwrite`).

    `threads` (0 = all cores) is capped at the number of cores unless `force_threads`."""
    progress = progress or NullProgress()
    if out_shard_size <= 0:
        raise ConfigError(f"out_shard_size must be positive, got {out_shard_size}")
    threads, note = worker_threads(threads, force_threads)
    notes = [note] if note else []
    if note:
        log.info("%s", note)
    info = build_plan(cfg, model_paths, threads=threads, out_shard_size=out_shard_size, seed=seed)
    dest = Path(out_dir).absolute()
    for p in info.model_paths.values():
        if dest == p or p.is_relative_to(dest):
            raise ConfigError(f"output directory {dest} would replace input model {p}")
    from finrecipe import _core

    t0 = time.monotonic()
    with atomic_output_dir(dest, overwrite=overwrite) as tmp:
        plan = dict(info.plan)
        plan["out_dir"] = str(tmp)
        with progress.task(f"merging ({cfg.merge_method})", total=info.out_bytes, unit="B") as task:
            t_start = time.monotonic()

            def cb(done: int, total: int) -> None:
                dt = time.monotonic() - t_start
                rate = done / dt / 1e6 if dt > 0 else 0.0
                task.update(completed=done, total=total,
                            info=f"{done / 1e6:,.0f}/{total / 1e6:,.0f} MB {rate:,.0f} MB/s")

            work = tmp / VOCAB_DIR
            if info.vocab is not None:  # each model's vocabulary tensors rearranged into the output's
                plan = write_vocab_inputs(info.vocab, plan, info.model_paths, work)
            res = _core.merge(json.dumps(plan), cb)
            shutil.rmtree(work, ignore_errors=True)
        _write_side_files(cfg, info, tmp)
    seconds = time.monotonic() - t0
    files = sorted(p.name for p in dest.iterdir())
    return MergeResult(out_dir=dest, files=files, total_bytes=int(res.get("total_bytes", info.out_bytes)),
                       tensors=int(res.get("tensors", info.num_tensors)), seconds=seconds,
                       method=cfg.merge_method, info=info, extra=dict(res), notes=notes)


def _out_dtype(info: MergePlanInfo) -> str | None:
    dts = {t["out_dtype"] for t in info.plan["tensors"] if t["out_dtype"] in _DTYPE_NAMES}
    if len(dts) == 1:
        return _DTYPE_NAMES[dts.pop()]
    return None


def _write_side_files(cfg: MergeConfig, info: MergePlanInfo, tmp: Path) -> None:
    donor = info.model_paths[info.config_donor]
    tok = info.model_paths[info.tokenizer_donor]
    try:
        cfg_path = donor / "config.json"
        if cfg_path.is_file():
            c = json.loads(cfg_path.read_text(encoding="utf-8"))
            # FP8 inputs are dequantised: the output is quantized only when asked (out_dtype FP8),
            # in the block layout of the FP8 input.
            if info.fp8_config is not None:
                c["quantization_config"] = info.fp8_config
            else:
                c.pop("quantization_config", None)
            dt = _out_dtype(info)
            if dt is not None:
                keys = [k for k in ("dtype", "torch_dtype") if k in c] or ["dtype"]
                for k in keys:
                    c[k] = dt
            if info.vocab is not None:  # mergekit's rule: the output tokenizer's size, padded
                c["vocab_size"] = info.vocab.rows
            if info.num_layers is not None and cfg.slices is not None:
                for k in ("num_hidden_layers", "n_layer", "num_layers"):
                    if k in c:
                        c[k] = info.num_layers
                        break
            (tmp / "config.json").write_text(json.dumps(c, indent=2) + "\n", encoding="utf-8")
        else:
            log.warning("%s has no config.json; the output will not load with transformers", donor)
        gen = donor / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / "generation_config.json")
        template = resolve_chat_template(cfg, info.model_paths)
        if info.vocab is not None:  # the built tokenizer, written by transformers as mergekit does
            save_tokenizer(info.vocab.tokenizer, tmp, template)
        elif cfg.chat_template is not None:
            # mergekit re-serializes the donor's tokenizer with the template set (`auto` finding no
            # template keeps the donor's)
            save_tokenizer(load_tokenizer(info.tokenizer_donor, tok), tmp, template)
        else:
            for f in TOKENIZER_FILES:
                if (tok / f).is_file():
                    shutil.copyfile(tok / f, tmp / f)
        (tmp / "mergekit_config.yml").write_text(_config_text(cfg), encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(cfg, info), encoding="utf-8")
    except OSError as e:
        raise IoError(f"writing metadata into {tmp}: {e}") from None
    except json.JSONDecodeError as e:
        raise IoError(f"{donor}: config.json / tokenizer_config.json is not valid JSON: {e}") from None


def _config_text(cfg: MergeConfig) -> str:
    import yaml

    if cfg.file and not cfg._prefix:
        try:
            return Path(cfg.file).read_text(encoding="utf-8")
        except OSError:
            pass
    return yaml.safe_dump(cfg.raw(), sort_keys=False)


def _model_card(cfg: MergeConfig, info: MergePlanInfo) -> str:
    import yaml

    lines = ["---", "library_name: transformers", "tags:", "- merge", "- finrecipe", "---", "",
             f"# {cfg.name or 'Merged model'}", "",
             f"This model was merged with finrecipe using the **{cfg.merge_method}** "
             "method (mergekit-compatible configuration).", "", "## Inputs", ""]
    for name, p in info.model_paths.items():
        role = " (base)" if name == cfg.base_model else ""
        lines.append(f"- `{name}`{role}: `{p}`")
    lines += ["", "## Parameters", ""]
    if cfg.parameters:
        lines.append("Global: `" + json.dumps(_plain(cfg.parameters)) + "`")
    for m in cfg.models or []:
        if m.parameters:
            lines.append(f"- `{m.model}`: `" + json.dumps(_plain(m.parameters)) + "`")
    if not cfg.parameters and not any(m.parameters for m in cfg.models or []):
        lines.append("Method defaults.")
    odt = _out_dtype(info)
    if info.fp8_inputs:
        lines += ["", "FP8 block-scaled inputs were dequantized (weight × block scale) and merged in float32."]
    if info.fp8_config is not None:
        lines += ["The output is FP8 E4M3 requantized per block (scale = block amax / 448), "
                  f"blocks {info.fp8_config.get('weight_block_size')}."]
    lines += ["", f"Output dtype: {odt or 'mixed'}; {info.num_tensors} tensors, "
              f"{info.num_params:,} parameters.", "", "## Configuration", "", "```yaml",
              yaml.safe_dump(cfg.raw(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _plain(params: Mapping[str, Any]) -> Any:
    from pydantic import BaseModel

    def conv(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v.model_dump(exclude_none=True)
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in params.items()}
