"""High-level evaluation entry points used by the CLI and the `evaluate` stage."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError
from finrecipe.progress import NullProgress, Progress


def parse_versions(spec: str | Sequence[str]) -> list[str]:
    from finrecipe.eval.tasks.jfin import VERSIONS

    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(VERSIONS)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    vs = list(spec)
    bad = [v for v in vs if v not in VERSIONS]
    if bad:
        raise ConfigError(f"unknown prompt version(s) {', '.join(bad)}; known: {', '.join(VERSIONS)} or 'all'")
    return vs


def make_scorer(model_path: str | Path, *, device: str | None = None, dtype: str | None = None,
                batch_size: int | None = None) -> Any:
    from finrecipe.eval.model import load_model
    from finrecipe.eval.scoring import Scorer

    model, tok = load_model(model_path, device=device, dtype=dtype)
    kw: dict[str, Any] = {}
    if batch_size:
        kw["max_batch"] = batch_size
        kw["batch_tokens"] = 1 << 30
    return Scorer(model, tok, **kw)


def evaluate_models(models: Sequence[str | Path], *, data_dir: str | Path, versions: Sequence[str] = ("default",),
                    tasks: Sequence[str] | None = None, batch_size: int | None = None,
                    device: str | None = None, dtype: str | None = None, limit: int | None = None,
                    names: Sequence[str] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """{"models": {name: {"path", "jfin": summary, "jfin_versions": results}}} for each model."""
    from finrecipe.eval.runner import evaluate_jfin, jfin_summary

    progress = progress or NullProgress()
    out: dict[str, Any] = {"suite": "jfin", "versions": list(versions), "limit": limit, "models": {}}
    for i, m in enumerate(models):
        name = names[i] if names else Path(m).name
        scorer = make_scorer(m, device=device, dtype=dtype, batch_size=batch_size)
        res = evaluate_jfin(scorer, data_dir, versions=versions, tasks=tasks, limit=limit, progress=progress)
        out["models"][name] = {"path": str(m), "jfin": jfin_summary(res), "jfin_versions": res}
        del scorer
        gc.collect()
    return out
