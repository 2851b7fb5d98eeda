#!/usr/bin/env python
"""Karcher (float32 compute, no base) on one tensor of the full-size trio: which per-tensor scalar
puts finrecipe's output off mergekit's.

Usage: .venv-mergekit/bin/python bench/fullsize/karcher_scalars.py TENSOR [TENSOR ...]
           [--models DIR] [--finrecipe OUT_DIR] [--mergekit OUT_DIR]

For each tensor: mergekit 0.1.5's own `karcher_merge_tensors` (imported, run on the float32 inputs)
gives the reference; a float32 torch trace of the same iteration records its scalars (source
norms, initial mean norm, per step the dots, the tangent norm and the renormalising norm); the
coefficient iteration of finrecipe (exact f64 Gram matrix) is then run with chosen scalars taken
from the trace instead, and each variant's bf16 output is compared with mergekit's: differing
elements, > 1 bf16 ulp, max ulp. If --finrecipe/--mergekit are given, the saved outputs are compared
too (confirms that the per-tensor reference equals the real mergekit run).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import compare_tensor, tensor_files  # noqa: E402

DEF_MODELS = Path(__file__).resolve().parents[1] / "out" / "models"


def load(models: Path, who: str, name: str) -> torch.Tensor:
    idx = json.loads((models / who / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(models / who / idx[name]), "pt") as h:
        return h.get_tensor(name)


def trace_f32(xs, max_iter=10, tol=1e-5):
    """The float32 iteration with every scalar recorded (torch ops as mergekit 0.1.5 states them;
    written here independently to expose the scalars). Returns (output f32, trace)."""
    n = len(xs)
    alphas = [1.0 / n] * n
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [(x / nm) for x, nm in zip(xs, norms, strict=True)]
    tr = {"norms": [float(v) for v in norms], "steps": []}
    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units, strict=True):
        mean += a * u
    mn = torch.linalg.vector_norm(mean)
    tr["mean_norm"] = float(mn)
    mean = mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        st = {"dots": [], "skipped": []}
        for a, u in zip(alphas, units, strict=True):
            d = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            th = torch.arccos(d)
            st["dots"].append(float(d))
            if th.item() < tol:
                st["skipped"].append(True)
                continue
            st["skipped"].append(False)
            tangent += a * (th / torch.sin(th)) * (u - d * mean)
        tn = torch.linalg.vector_norm(tangent)
        st["tn"] = float(tn)
        if tn.item() < tol:
            tr["steps"].append(st)
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        st["un"] = float(un)
        if un.item() > tol:
            mean = mean / un
        tr["steps"].append(st)
    scale = sum(a * nm for a, nm in zip(alphas, norms, strict=True))
    tr["scale"] = float(scale)
    tr["final_mean_norm"] = float(mean.double().norm())
    return scale * mean, tr


def coeff_iteration(xs64, gram, tr=None, use=(), max_iter=10, tol=1e-5):
    """finrecipe's coefficient iteration (f64 Gram) with the scalars named in `use` taken from the
    float32 trace: 'norms' (sources' norms, so units and scale), 'mean_norm', 'dots', 'tn', 'un',
    'iters' (the trace's step count and skips); 'full': no stop on the tangent norm (max_iter
    steps); 'scale': the output scaled as mergekit's (its f32 source norms' weighted sum times the
    exact length of its last iterate)."""
    n = len(xs64)
    exact = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    norms = tr["norms"] if "norms" in use else exact
    alphas = [1.0 / n] * n
    # unit u_i = x_i / norms[i]; <u_i,u_j> from the Gram matrix
    U = [[gram[i][j] / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]

    def dvv(a, b):
        return sum(a[i] * b[j] * U[i][j] for i in range(n) for j in range(n))

    mean = [a for a in alphas]
    mn = tr["mean_norm"] if "mean_norm" in use else math.sqrt(max(dvv(mean, mean), 0.0))
    mean = [m / mn for m in mean]
    steps = tr["steps"] if tr else []
    k = 0
    while k < max_iter:
        if "iters" in use and k >= len(steps):
            break
        tangent = [0.0] * n
        for i in range(n):
            e = [0.0] * n
            e[i] = 1.0
            d = steps[k]["dots"][i] if "dots" in use and k < len(steps) else max(-1.0, min(1.0, dvv(mean, e)))
            th = math.acos(d)
            skip = steps[k]["skipped"][i] if "iters" in use and k < len(steps) else th < tol
            if skip:
                continue
            c = alphas[i] * th / math.sin(th)
            tangent[i] += c
            for j in range(n):
                tangent[j] -= c * d * mean[j]
        tn = steps[k]["tn"] if "tn" in use and k < len(steps) else math.sqrt(max(dvv(tangent, tangent), 0.0))
        if ("iters" not in use and "full" not in use and tn < tol) or ("iters" in use and "un" not in steps[k]):
            break
        mean = [math.cos(tn) * m + math.sin(tn) * t / tn for m, t in zip(mean, tangent, strict=True)]
        un = steps[k]["un"] if "un" in use and k < len(steps) and "un" in steps[k] else math.sqrt(max(dvv(mean, mean), 0.0))
        if un > tol:
            mean = [m / un for m in mean]
        k += 1
    scale = sum(a * nm for a, nm in zip(alphas, norms, strict=True))
    if "scale" in use:
        # mergekit's output scale: its f32 norms' mean times the exact length of its last iterate
        mlen = math.sqrt(max(dvv(mean, mean), 0.0))
        scale = sum(a * nm for a, nm in zip(alphas, tr["norms"], strict=True)) * tr["final_mean_norm"] / mlen
    coef = [scale * mean[i] / norms[i] for i in range(n)]
    out = sum(c * x for c, x in zip(coef, xs64, strict=True))
    return out, coef, k


def survey(args):
    who = args.order.split(",")
    variants = [(), ("full",), ("norms", "mean_norm"), ("norms", "mean_norm", "un"),
                ("norms", "mean_norm", "dots", "tn", "un")]
    print("tensor | numel | torch norm / exact - 1 (sources) | mergekit f32 tn per step | exact tn per step | "
          + " | ".join(",".join(v) or "exact" for v in variants) + "  (differ / > 1 ulp non-noise / max ulp)")
    for name in args.tensors:
        xs = [load(args.models, w, name).float() for w in who]
        out32, tr = trace_f32(xs)
        ref = out32.to(torch.bfloat16)
        x64 = [x.double() for x in xs]
        gram = [[float((a * b).sum()) for b in x64] for a in x64]
        exact = [math.sqrt(gram[i][i]) for i in range(len(xs))]
        cells = []
        for use in variants:
            out, coef, k = coeff_iteration(x64, gram, tr, use)
            r, _ = compare_tensor(out.to(torch.bfloat16), ref)
            cells.append(f"{r['differ']}/{r['beyond1'] - r.get('beyond1_noise', 0)}/{r['max_ulp']}")
        tns = exact_tns(gram, len(xs))
        print(f"{name} | {xs[0].numel()} | " + ",".join(f"{t / e - 1:+.1e}" for t, e in zip(tr["norms"], exact, strict=True))
              + " | " + ",".join(f"{s['tn']:.1e}" for s in tr["steps"]) + " | " + ",".join(f"{t:.1e}" for t in tns)
              + " | " + " | ".join(cells))
        sys.stdout.flush()
    return 0


def exact_tns(gram, n, steps=10):
    """Tangent norms of the exact iteration, never stopping."""
    tns = []
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    U = [[gram[i][j] / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]

    def dvv(a, b):
        return sum(a[i] * b[j] * U[i][j] for i in range(n) for j in range(n))

    mean = [1.0 / n] * n
    mn = math.sqrt(dvv(mean, mean))
    mean = [m / mn for m in mean]
    for _ in range(steps):
        tangent = [0.0] * n
        for i in range(n):
            e = [0.0] * n
            e[i] = 1.0
            d = max(-1.0, min(1.0, dvv(mean, e)))
            th = math.acos(d)
            if th < 1e-5:
                continue
            c = th / math.sin(th) / n
            tangent[i] += c
            for j in range(n):
                tangent[j] -= c * d * mean[j]
        tn = math.sqrt(max(dvv(tangent, tangent), 0.0))
        tns.append(tn)
        if tn == 0:
            break
        mean = [math.cos(tn) * m + math.sin(tn) * t / tn for m, t in zip(mean, tangent, strict=True)]
        un = math.sqrt(dvv(mean, mean))
        mean = [m / un for m in mean]
    return tns


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tensors", nargs="+")
    ap.add_argument("--models", type=Path, default=DEF_MODELS)
    ap.add_argument("--order", default="base,instruct,cpt", help="the config's model order")
    ap.add_argument("--finrecipe", type=Path)
    ap.add_argument("--mergekit", type=Path)
    ap.add_argument("--survey", action="store_true",
                    help="one line per tensor: the float32 trace is the reference (it equals mergekit's "
                         "function bit for bit on the tensors checked) and four variants")
    args = ap.parse_args()
    if args.survey:
        return survey(args)
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    who = args.order.split(",")
    frf = tensor_files(args.finrecipe) if args.finrecipe else {}
    mkf = tensor_files(args.mergekit) if args.mergekit else {}
    for name in args.tensors:
        xs = [load(args.models, w, name).float() for w in who]
        ref = karcher_merge_tensors(xs, [1.0 / len(xs)] * len(xs)).to(torch.bfloat16)
        print(f"== {name} {tuple(xs[0].shape)} (torch threads {torch.get_num_threads()})")
        if name in mkf:
            with safe_open(str(mkf[name]), "pt") as h:
                r, _ = compare_tensor(h.get_tensor(name), ref)
            print(f"  saved mergekit run vs per-tensor mergekit: {r['differ']} differ")
        if name in frf:
            with safe_open(str(frf[name]), "pt") as h:
                r, _ = compare_tensor(h.get_tensor(name), ref)
            print(f"  saved finrecipe vs mergekit: {r['differ']:,} differ, {r['beyond1']:,} > 1 ulp "
                  f"({r.get('beyond1_noise', 0)} noise), max {r['max_ulp']}")
        out32, tr = trace_f32(xs)
        r, _ = compare_tensor(out32.to(torch.bfloat16), ref)
        print(f"  trace replay vs mergekit: {r['differ']} differ ({len(tr['steps'])} steps)")
        x64 = [x.double() for x in xs]
        gram = [[float((a * b).sum()) for b in x64] for a in x64]
        exact = [math.sqrt(gram[i][i]) for i in range(len(xs))]
        print("  norms f32 torch / exact - 1: " + ", ".join(f"{t:.9g} ({t / e - 1:+.3e})" for t, e in zip(tr["norms"], exact, strict=True)))
        print(f"  mean_norm {tr['mean_norm']:.9g}; steps: " + "; ".join(
            f"dots {[f'{d:.9f}' for d in s['dots']]} tn {s['tn']:.3e}" + (f" un {s['un']:.9g}" if 'un' in s else "")
            for s in tr["steps"]))
        variants = [(), ("norms",), ("norms", "mean_norm"), ("norms", "mean_norm", "dots"),
                    ("norms", "mean_norm", "dots", "tn"), ("norms", "mean_norm", "dots", "tn", "un"),
                    ("norms", "mean_norm", "dots", "tn", "un", "iters"), ("norms", "iters"),
                    ("norms", "un"), ("norms", "tn", "un"), ("norms", "mean_norm", "un"),
                    ("full",), ("norms", "full"), ("norms", "un", "full"), ("full", "scale")]
        for use in variants:
            out, coef, k = coeff_iteration(x64, gram, tr, use)
            r, _ = compare_tensor(out.to(torch.bfloat16), ref)
            print(f"  from trace: {','.join(use) or '(none: exact)':42s} {k:2d} steps coef "
                  f"{[f'{c:.9g}' for c in coef]}: {r['differ']:,} differ, {r['beyond1']:,} > 1 ulp "
                  f"({r.get('beyond1_noise', 0)} noise), max {r['max_ulp']}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
