"""Task-vector analysis: how independent are δ_i = θ_i − θ_base (e.g. the instruction vector and the
domain vector)?

The Rust core (`finrecipe._core.analyze`) streams the memory-mapped checkpoints and returns, per
tensor, the Gram matrix G[i][j] = ⟨δ_i, δ_j⟩ in f64 plus the whole-model total. This module builds the
plan (tensor names and shapes from the headers), then derives:

- per pair: global cosine G_ij / sqrt(G_ii G_jj) and both norms;
- per tensor and per layer (sums of Gram matrices over the layer's tensors): cosines and norms;
- one heatmap PNG per pair: layers × module types (q_proj, k_proj, ..., down_proj, norms);
- `analysis.json` with all figures.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finrecipe.errors import MismatchError
from finrecipe.progress import NullProgress, Progress

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def build_plan(base: str | Path, models: Sequence[str | Path], *, threads: int = 0,
               chunk_elems: int = 1 << 20) -> dict[str, Any]:
    """The analysis plan over the float tensors every model shares with the base (same shape).
    Integer and boolean buffers are left out; FP8 block-scaled weights are read dequantised (as
    the merge reads them); other quantized checkpoints and tensors are refused by name."""
    from finrecipe.merge import read_model
    from finrecipe.merge.quant import (
        ARITH_DTYPES,
        FP8,
        check_not_quantized,
        fp8_layout,
        is_scale_tensor,
        scale_of,
        why_not_combinable,
    )

    paths = [Path(base).absolute(), *[Path(m).absolute() for m in models]]
    for p in paths:
        check_not_quantized(p.name, p)
    infos = [read_model(p) for p in paths]
    layouts = [fp8_layout(p) for p in paths]

    def ref(k: int, name: str) -> dict[str, Any]:
        """A tensor reference, with its block scales when it is an FP8 weight; refuses what no
        task vector can be computed from."""
        ti = infos[k].tensors[name]
        r: dict[str, Any] = {"model": k, "tensor": name}
        lay = layouts[k]
        if lay is not None and ti.dtype == FP8 and scale_of(name) in infos[k].tensors:
            r["scale"] = {"tensor": scale_of(name), "block": list(lay.block)}
        elif ti.dtype not in ARITH_DTYPES:
            raise MismatchError(f"{paths[k]}: tensor {name!r} is {ti.dtype}: task vectors are computed in "
                                f"float32 from BF16, F16 or F32 tensors, and {why_not_combinable(ti.dtype)}")
        return r

    tensors = []
    for name, ti in infos[0].tensors.items():
        if layouts[0] is not None and is_scale_tensor(infos[0].tensors, name):
            continue  # read with its FP8 weight
        if (why_not_combinable(ti.dtype) or "").startswith("integer"):
            continue  # buffers (position ids, masks) are not part of a task vector
        for k, info in enumerate(infos[1:], 1):
            other = info.tensors.get(name)
            if other is None:
                raise MismatchError(f"{paths[k]}: tensor {name!r} of the base model is missing; task vectors "
                                    "need models of the same architecture")
            if tuple(other.shape) != tuple(ti.shape):
                raise MismatchError(f"{paths[k]}: tensor {name!r} has shape {list(other.shape)}, the base has "
                                    f"{list(ti.shape)}")
        tensors.append({"name": name, "base": ref(0, name),
                        "vectors": [ref(k, name) for k in range(1, len(paths))]})
    return {"models": [str(p) for p in paths], "threads": threads, "chunk_elems": chunk_elems,
            "tensors": tensors}


def run_plan(plan: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    from finrecipe import _core

    progress = progress or NullProgress()
    with progress.task("analyze", total=None, unit="B") as task:
        def cb(done: int, total: int) -> None:
            task.update(completed=done, total=total)

        return dict(_core.analyze(json.dumps(plan), cb))


def _cos(g: Sequence[Sequence[float]], i: int, j: int) -> float | None:
    d = g[i][i] * g[j][j]
    return g[i][j] / math.sqrt(d) if d > 0 else None


def split_name(name: str) -> tuple[int | None, str]:
    """(layer index or None, module type) of a tensor name, e.g. (3, "self_attn.q_proj")."""
    m = LAYER_RE.search(name)
    if not m:
        return None, re.sub(r"\.(weight|bias)$", "", name)
    return int(m.group(1)), m.group(2)


def figures(raw: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """All figures from the per-tensor Gram matrices; `names` are the vectors' names."""
    k = len(names)
    pairs_idx = [(i, j) for i in range(k) for j in range(i + 1, k)]
    tg = raw["total"]["gram"]
    pairs = [{"a": names[i], "b": names[j], "cosine": _cos(tg, i, j), "norm_a": math.sqrt(max(tg[i][i], 0.0)),
              "norm_b": math.sqrt(max(tg[j][j], 0.0)), "dot": tg[i][j]} for i, j in pairs_idx]
    tensors = {}
    layers: dict[int, list[list[float]]] = {}
    cells: dict[tuple[int, str], list[list[float]]] = {}
    for name, t in raw["tensors"].items():
        g = t["gram"]
        tensors[name] = {"numel": t["numel"], "norms": [math.sqrt(max(g[i][i], 0.0)) for i in range(k)],
                         "cosines": {f"{names[i]}|{names[j]}": _cos(g, i, j) for i, j in pairs_idx}}
        layer, module = split_name(name)
        if layer is None:
            continue
        for acc in (layers.setdefault(layer, [[0.0] * k for _ in range(k)]),
                    cells.setdefault((layer, module), [[0.0] * k for _ in range(k)])):
            for i in range(k):
                for j in range(k):
                    acc[i][j] += g[i][j]
    per_layer = {str(li): {"norms": [math.sqrt(max(g[i][i], 0.0)) for i in range(k)],
                           "cosines": {f"{names[i]}|{names[j]}": _cos(g, i, j) for i, j in pairs_idx}}
                 for li, g in sorted(layers.items())}
    modules = sorted({m for _, m in cells})
    layer_ids = sorted(layers)
    heat = {}
    for i, j in pairs_idx:
        heat[f"{names[i]}|{names[j]}"] = [[_cos(cells[(li, m)], i, j) if (li, m) in cells else None
                                           for m in modules] for li in layer_ids]
    return {"vectors": list(names), "pairs": pairs, "per_layer": per_layer, "tensors": tensors,
            "heatmap": {"layers": layer_ids, "modules": modules, "cosine": heat},
            "numel": raw["total"]["numel"]}


def heatmap_png(fig: dict[str, Any], pair: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    h = fig["heatmap"]
    data = np.array([[np.nan if v is None else v for v in row] for row in h["cosine"][pair]], dtype=float)
    a, b = pair.split("|", 1)
    f, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(h["modules"]), 1), 1.5 + 0.35 * max(len(h["layers"]), 1)))
    if data.size:
        lim = max(float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0, 1e-6)
        im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        f.colorbar(im, ax=ax, label="cosine")
    ax.set_xticks(range(len(h["modules"])), h["modules"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(h["layers"])), [str(x) for x in h["layers"]], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(f"cos(δ {a}, δ {b}) per layer × module", fontsize=9)
    f.tight_layout()
    buf = io.BytesIO()
    f.savefig(buf, format="png", dpi=100)
    plt.close(f)
    return buf.getvalue()


def analyze(base: str | Path, models: Sequence[str | Path], *, out_dir: str | Path | None = None,
            names: Sequence[str] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run the analysis; with `out_dir`, write analysis.json and one heatmap PNG per pair there.

    `names` (optional) names the base then each model; defaults to directory names."""
    if len(models) < 2:
        raise MismatchError("analyze needs at least two models besides the base (a pair of task vectors)")
    vec_names = list(names[1:]) if names else [Path(m).name for m in models]
    if len(set(vec_names)) != len(vec_names):
        vec_names = [f"{n}#{i}" for i, n in enumerate(vec_names)]
    plan = build_plan(base, models)
    raw = run_plan(plan, progress)
    fig = figures(raw, vec_names)
    fig["base"] = names[0] if names else Path(base).name
    fig["heatmaps"] = []
    if out_dir is not None:
        from finrecipe.util.fs import atomic_dir

        out = Path(out_dir)
        with atomic_dir(out, overwrite=True) as tmp:
            for n, pair in enumerate(fig["heatmap"]["cosine"]):
                fname = f"heatmap_{n}.png"
                (tmp / fname).write_bytes(heatmap_png(fig, pair))
                fig["heatmaps"].append(str(out.absolute() / fname))
            (tmp / "analysis.json").write_text(json.dumps(fig, indent=1, ensure_ascii=False), encoding="utf-8")
    return fig
