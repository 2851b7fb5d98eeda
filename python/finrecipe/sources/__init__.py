"""Model and dataset sources: local directories, the Hugging Face hub, fresh random (`init:`) models.

The source node kinds are the modules of this package (`model_path`, `model_hub`, `model_init`,
`dataset_files`, `dataset_hub`); this module holds what they share.

Network access happens only in `hub_resolve_commit` and `hub_snapshot` (both go through
huggingface_hub, which honours HF_HUB_OFFLINE); tests replace those two functions. torch and
transformers are imported only inside `build_init_model`.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError, DataError, FinrecipeError, FormatError, IoError
from finrecipe.progress import NullProgress, Progress
from finrecipe.util.fs import atomic_dir

log = logging.getLogger("finrecipe.sources")

# Files of a model repository that are safe to fetch (no pickles, no code).
MODEL_PATTERNS: tuple[str, ...] = (
    "*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja",
)
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.ckpt")
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "added_tokens.json",
    "chat_template.*",
)
DATASET_PATTERNS_DEFAULT: tuple[str, ...] = ("*.jsonl", "*.jsonl.gz", "*.parquet", "*.txt", "*.json")

INIT_VERSION = "1"
MAX_INIT_PARAMS = 2_000_000_000


def is_commit(revision: str | None) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


# ---------------------------------------------------------------- hub (the only network access)

def hub_resolve_commit(repo_id: str, revision: str | None, repo_type: str = "model") -> str:
    """The commit hash `revision` (branch, tag or commit; None = main) points at on the hub."""
    if is_commit(revision):
        assert revision is not None
        return revision
    try:
        from huggingface_hub import HfApi

        info = HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type)
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth, HTTP)
        raise IoError(
            f"cannot resolve revision {revision or 'main'!r} of {repo_type} {repo_id!r} on the hub: "
            f"{type(e).__name__}: {e}. Pin 'revision' to a 40-hex commit, or resolve once with "
            "network access (`finrecipe lock RECIPE`) so the lockfile records the commit."
        ) from None
    sha = getattr(info, "sha", None)
    if not sha:
        raise IoError(f"the hub returned no commit for {repo_id}@{revision}")
    return str(sha)


def hub_snapshot(repo_id: str, commit: str, *, allow_patterns: Sequence[str], repo_type: str = "model") -> Path:
    """The files of `repo_id` at `commit` matching `allow_patterns`, in the Hugging Face cache
    (`HF_HUB_CACHE` / `HF_HOME`, huggingface_hub's snapshot layout): downloaded once and shared with
    every other recipe and tool that uses the cache; with `HF_HUB_OFFLINE=1` only the cache is read.
    Returns the snapshot directory."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo_id, revision=commit, repo_type=repo_type,
                                 allow_patterns=list(allow_patterns))
    except FinrecipeError:
        raise
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (" (HF_HUB_OFFLINE is set and the Hugging Face cache has no snapshot of that commit: "
                "download it once with network access)" if offline else "")
        raise IoError(f"fetching {repo_type} {repo_id}@{commit[:12]} failed: {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:300]}{hint}") from None
    return Path(str(path))


def model_files_problem(name: str, where: str, model_dir: Path, *, allow_pickle: bool) -> str | None:
    """Why `model_dir` is not a usable model (no config.json, no weights, pickle-only weights
    without `allow_pickle`), or None."""
    from finrecipe.sources.convert import has_safetensors, pickle_weights

    if not has_safetensors(model_dir):
        if pickle_weights(model_dir):
            if not allow_pickle:
                return (f"model {name!r} ({where}) ships only pickle weights (pytorch_model.bin), which "
                        f"can run code when loaded; if you trust it, set 'allow_pickle: true' on "
                        f"models.{name} (finrecipe converts them once to safetensors with "
                        "torch.load(weights_only=True)), or convert them yourself with `finrecipe convert`")
            return None
        return (f"model {name!r} ({where}) has no .safetensors weights"
                + ("" if allow_pickle else "; if it only ships pickle .bin weights and you trust it, set "
                   f"'allow_pickle: true' on models.{name}"))
    if not (model_dir / "config.json").is_file():
        return f"model {name!r} ({where}) has no config.json"
    return None


def fetch_hub_model(name: str, repo_id: str, commit: str, *, allow_pickle: bool) -> Path:
    """The snapshot of a model repository in the Hugging Face cache (no pickles fetched unless
    `allow_pickle`). Raises FormatError when it is not a usable model."""
    patterns = list(MODEL_PATTERNS) + (list(PICKLE_PATTERNS) if allow_pickle else [])
    snap = hub_snapshot(repo_id, commit, allow_patterns=patterns)
    problem = model_files_problem(name, f"{repo_id}@{commit[:12]}", snap, allow_pickle=allow_pickle)
    if problem:
        raise FormatError(problem)
    return snap


# ---------------------------------------------------------------- init: fresh random models

def build_init_model(config: Mapping[str, Any], *, seed: int, dtype: str, dest: Path,
                     tokenizer_dir: Path | None, progress: Progress | None = None) -> Path:
    """Build a random model from a transformers config dict and save it (with tokenizer) to `dest`."""
    progress = progress or NullProgress()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as tf_logging

    tf_logging.disable_progress_bar()  # library code does not print; progress goes through `progress`

    cfg_d = dict(config)
    model_type = cfg_d.pop("model_type", None)
    archs = cfg_d.get("architectures")
    try:
        if model_type is None:
            import transformers

            cls = getattr(transformers, str(archs[0]), None) if archs else None
            if cls is None or not hasattr(cls, "config_class"):
                raise ConfigError(f"init: unknown architecture {archs!r}; give 'model_type' instead")
            model_type = cls.config_class.model_type
        cfg = AutoConfig.for_model(model_type, **cfg_d)
        with torch.device("meta"):  # count the parameters before allocating anything
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    except ConfigError:
        raise
    except Exception as e:  # transformers validates configs with many exception types
        raise ConfigError(f"init: bad transformers config for {model_type or archs!r}: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if n_params > MAX_INIT_PARAMS:
        raise ConfigError(f"init: the config makes a model of {n_params:,} parameters; init: models are for "
                          f"tests and demos (at most {MAX_INIT_PARAMS:,}); start from a real checkpoint "
                          "(path: or hub:) instead")
    try:
        with progress.task(f"init {model_type}", total=1), atomic_dir(dest, overwrite=True) as tmp:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(cfg)
            model = model.to(getattr(torch, dtype))
            model.save_pretrained(tmp)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
    except OSError as e:
        raise IoError(f"{dest}: cannot write the model: {e.strerror or e}") from None
    return dest


def copy_tokenizer(src: Path, dest: Path) -> list[str]:
    """Copy tokenizer files from a model/tokenizer directory."""
    import fnmatch

    if not src.is_dir():
        raise ConfigError(f"tokenizer directory not found: {src}")
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_PATTERNS):
            shutil.copy2(p, dest / p.name)
            copied.append(p.name)
    if not copied:
        raise ConfigError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in {src}")
    return copied


# ---------------------------------------------------------------- datasets

def expand_globs(patterns: Sequence[str], base: Path) -> list[Path]:
    """Files matching glob `patterns` (relative to `base`; `**` recurses), sorted, deduplicated."""
    out: dict[str, Path] = {}
    for pat in patterns:
        full = pat if os.path.isabs(pat) else str(base / pat)
        hits = sorted(_glob.glob(full, recursive=True))
        files = [Path(h) for h in hits if os.path.isfile(h)]
        if not files:
            raise DataError(f"no files match {pat!r} (relative to {base})")
        for f in files:
            out.setdefault(str(f.absolute()), f.absolute())
    return [out[k] for k in sorted(out)]


def fetch_hub_dataset(repo_id: str, commit: str, patterns: Sequence[str]) -> tuple[Path, list[Path]]:
    """The snapshot of a dataset repository in the Hugging Face cache, and its files (sorted)."""
    snap = hub_snapshot(repo_id, commit, allow_patterns=list(patterns) or list(DATASET_PATTERNS_DEFAULT),
                        repo_type="dataset")
    files = sorted(p for p in snap.rglob("*") if p.is_file() and ".cache" not in p.relative_to(snap).parts)
    if not files:
        raise DataError(f"dataset {repo_id}@{commit[:12]}: no files match {list(patterns)}")
    return snap, files
