#!/usr/bin/env python
"""The proposed float32 karcher (no base) computation, tensor by tensor, compared with a saved
mergekit 0.1.5 output of the same config on the full-size trio.

Usage: .venv-mergekit/bin/python bench/fullsize/karcher_proposal.py MERGEKIT_OUT [--finrecipe OUT]
           [--tensors A,B] [--un-last] [--models DIR] [--order base,instruct,cpt]

Proposal (finrecipe's coefficient iteration with mergekit's float32 norms):
  1. pass 1 (the Gram pass): G_ij = <x_i, x_j> in f64 and, per source, torch's float32
     vector_norm n_i (8 sequential f32 lanes of squares, then the lanes, then the tail; here taken
     from torch itself);
  2. pass 2: the f32 initial mean m0 = ((0 + f32(1/N)·f32(x_0/n_0)) + f32(1/N)·f32(x_1/n_1)) + ...
     elementwise as mergekit does it, and torch's float32 norm mn of it;
  3. the f64 iteration on coefficients over u_i = x_i/n_i with <u_i,u_j> = G_ij/(n_i n_j) and the
     start m0/mn (coefficients f32(1/N)/mn): the units and the mean are then not of length 1 exactly
     as in mergekit, so the dots, the clamp at 1 and the tangent norm against tol behave as
     mergekit's do; everything else exact (dots, tangent norm, renormalisation);
  4. output Σ c_i·x_i with c_i = f32(scale·mean_i/n_i), scale = Σ n_i/N (f32 accumulation as in
     finrecipe's output pass);
  --un-last: 5. one more pass: torch's f32 norm of the f32 last iterate before its renormalisation
     (from the coefficients), used instead of the exact one (only moves elements by 1 ulp).
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


def load_all(models, who, name):
    out = []
    for w in who:
        idx = json.loads((models / w / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(models / w / idx[name]), "pt") as h:
            out.append(h.get_tensor(name).float().reshape(-1))
    return out


def proposal(xs, un_last=False, max_iter=10, tol=1e-5):
    n = len(xs)
    x64 = [x.double() for x in xs]
    G = [[float(torch.dot(a, b)) for b in x64] for a in x64]
    nt = [float(torch.linalg.vector_norm(x)) for x in xs]  # torch's f32 norm (TorchNorm in Rust)
    a32 = float(torch.tensor(1.0 / n, dtype=torch.float32))
    m0 = torch.zeros_like(xs[0])
    for x, nm in zip(xs, nt, strict=True):
        m0 += a32 * (x / torch.tensor(nm, dtype=torch.float32))
    mn = float(torch.linalg.vector_norm(m0))
    U = [[G[i][j] / (nt[i] * nt[j]) for j in range(n)] for i in range(n)]

    def dvv(a, b):
        return sum(a[i] * b[j] * U[i][j] for i in range(n) for j in range(n))

    mean = [a32 / mn] * n
    steps, last_pre = 0, None
    for _ in range(max_iter):
        tangent = [0.0] * n
        for i in range(n):
            d = max(-1.0, min(1.0, sum(mean[j] * U[j][i] for j in range(n))))
            th = math.acos(d)
            if th < tol:
                continue
            c = (1.0 / n) * th / math.sin(th)
            tangent[i] += c
            for j in range(n):
                tangent[j] -= c * d * mean[j]
        tn = math.sqrt(max(dvv(tangent, tangent), 0.0))
        if tn < tol:
            break
        pre = [math.cos(tn) * m + math.sin(tn) * t / tn for m, t in zip(mean, tangent, strict=True)]
        un = math.sqrt(max(dvv(pre, pre), 0.0))
        last_pre = (pre, un)
        mean = [p / un for p in pre] if un > tol else pre
        steps += 1
    if un_last and last_pre is not None:
        pre, un = last_pre
        v = torch.zeros_like(xs[0], dtype=torch.float64)
        for p, x, nm in zip(pre, x64, nt, strict=True):
            v += (p / nm) * x
        un_t = float(torch.linalg.vector_norm(v.float()))
        mean = [p / un_t for p in pre]
    scale = sum(nm / n for nm in nt)
    coef = [float(torch.tensor(scale * mean[i] / nt[i], dtype=torch.float32)) for i in range(n)]
    out = torch.zeros_like(xs[0])
    for c, x in zip(coef, xs, strict=True):
        out += torch.tensor(c, dtype=torch.float32) * x
    return out, coef, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mergekit", type=Path)
    ap.add_argument("--finrecipe", type=Path)
    ap.add_argument("--tensors", help="comma-separated names (default: all)")
    ap.add_argument("--un-last", action="store_true")
    ap.add_argument("--models", type=Path, default=DEF_MODELS)
    ap.add_argument("--order", default="base,instruct,cpt")
    args = ap.parse_args()
    mk = tensor_files(args.mergekit)
    fr = tensor_files(args.finrecipe) if args.finrecipe else {}
    names = args.tensors.split(",") if args.tensors else sorted(mk)
    tot = {"numel": 0, "differ": 0, "beyond1": 0, "noise": 0, "fr_differ": 0, "fr_beyond1": 0, "fr_noise": 0}
    for name in names:
        xs = load_all(args.models, args.order.split(","), name)
        out, coef, steps = proposal(xs, un_last=args.un_last)
        with safe_open(str(mk[name]), "pt") as h:
            ref = h.get_tensor(name)
        r, _ = compare_tensor(out.to(torch.bfloat16), ref)
        tot["numel"] += r["numel"]
        tot["differ"] += r["differ"]
        tot["beyond1"] += r["beyond1"]
        tot["noise"] += r.get("beyond1_noise", 0)
        line = (f"{name}: {steps} steps, proposal vs mergekit {r['differ']:,} differ, "
                f"{r['beyond1'] - r.get('beyond1_noise', 0)} > 1 ulp beyond noise (max {r['max_ulp']})")
        if name in fr:
            with safe_open(str(fr[name]), "pt") as h:
                rf, _ = compare_tensor(h.get_tensor(name), ref)
            tot["fr_differ"] += rf["differ"]
            tot["fr_beyond1"] += rf["beyond1"]
            tot["fr_noise"] += rf.get("beyond1_noise", 0)
            line += f"; finrecipe now {rf['differ']:,} / {rf['beyond1'] - rf.get('beyond1_noise', 0)}"
        print(line, flush=True)
    print(f"TOTAL {tot['numel']:,} elements: proposal {tot['differ']:,} differ, {tot['beyond1']:,} > 1 ulp "
          f"({tot['noise']:,} within 2^-20 of the tensor max)"
          + (f"; finrecipe now {tot['fr_differ']:,} differ, {tot['fr_beyond1']:,} > 1 ulp ({tot['fr_noise']:,} noise)"
             if fr else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
