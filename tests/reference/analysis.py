"""Task-vector Gram matrices with torch in float64, one tensor at a time: the reference for
`finrecipe._core.analyze` (same plan in, same result shape out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finrecipe.progress import NullProgress, Progress
from reference.headers import py_read_model


def python_analyze(plan: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Same result as `_core.analyze`, one tensor at a time in Python (f64)."""
    import torch
    from safetensors import safe_open

    progress = progress or NullProgress()
    infos = [py_read_model(p) for p in plan["models"]]
    handles: dict[tuple[int, str], Any] = {}

    def load(model: int, name: str) -> Any:
        ti = infos[model].tensors[name]
        key = (model, ti.file)
        if key not in handles:
            handles[key] = safe_open(str(Path(plan["models"][model]) / ti.file), framework="pt")
        return handles[key].get_tensor(name).to(torch.float64).flatten()

    k = len(plan["tensors"][0]["vectors"]) if plan["tensors"] else 0
    total = [[0.0] * k for _ in range(k)]
    numel = 0
    out: dict[str, Any] = {}
    with progress.task("analyze", total=len(plan["tensors"]), unit="tensor") as task:
        for t in plan["tensors"]:
            b = load(t["base"]["model"], t["base"]["tensor"])
            ds = torch.stack([load(v["model"], v["tensor"]) - b for v in t["vectors"]])
            g = (ds @ ds.T).tolist()
            out[t["name"]] = {"gram": g, "numel": int(b.numel())}
            for i in range(k):
                for j in range(k):
                    total[i][j] += g[i][j]
            numel += int(b.numel())
            task.update(advance=1)
    return {"tensors": out, "total": {"gram": total, "numel": numel}}
