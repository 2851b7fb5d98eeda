#!/usr/bin/env python
"""model_stock and nuslerp (float32 compute, flattened, with base) on single tensors of the
full-size trio: mergekit's per-tensor scalars against finrecipe's, and which of scalar or
elementwise operation order puts an element off mergekit's saved output.

Usage: .venv-mergekit/bin/python bench/fullsize/elementwise_scalars.py {model_stock|nuslerp}
           MERGEKIT_OUT FINRECIPE_OUT TENSOR [TENSOR ...] [--models DIR]

The mergekit side is a float32 torch statement of 0.1.5's operations (checked against the saved
mergekit output: "replica" must show 0 differing elements); the finrecipe side states its Rust
arithmetic (f64 Gram sums, scalars rounded to f32 once; checked against the saved finrecipe output).
Config assumed: base, then instruct and cpt (weights 0.5/0.5 for nuslerp).
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
f32 = torch.float32


def load(models, who, name):
    idx = json.loads((models / who / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(models / who / idx[name]), "pt") as h:
        return h.get_tensor(name).float().reshape(-1)


def ulps32(a, b):
    """distance in float32 ulps of two floats"""
    ia = torch.tensor([a], dtype=f32).view(torch.int32).item()
    ib = torch.tensor([b], dtype=f32).view(torch.int32).item()
    return abs(ia - ib)


def r32(x):
    return torch.tensor(x, dtype=f32).item()


def cmp(label, out, ref):
    r, _ = compare_tensor(out.to(torch.bfloat16), ref)
    print(f"  {label}: {r['differ']:,} differ, {r['beyond1']:,} > 1 ulp "
          f"({r.get('beyond1_noise', 0)} within 2^-20 of max), max {r['max_ulp']}")


def model_stock(b, ws, ref, frout):
    offs = [w - b for w in ws]
    n0t, n1t = torch.norm(offs[0]), torch.norm(offs[1])
    dot_t = (offs[0] * offs[1]).sum()
    cos_t = (dot_t / (n0t * n1t).clamp(min=1e-6)).clamp(-1, 1)
    cos_m = torch.stack([cos_t]).mean(dim=0)
    t_mk = (2 * cos_m) / (1 + (2 - 1) * cos_m)
    # finrecipe: f64 sums, f32 scalars
    o64 = [o.double() for o in offs]
    dot64, g00, g11 = float(torch.dot(o64[0], o64[1])), float(torch.dot(o64[0], o64[0])), float(torch.dot(o64[1], o64[1]))
    na, nb = r32(math.sqrt(g00)), r32(math.sqrt(g11))
    npf = r32(na * nb)
    cos_f = r32(min(max(r32(r32(dot64) / max(npf, r32(1e-6))), -1.0), 1.0))
    cos_f = r32(cos_f / 1.0)
    t_fr = r32(r32(2.0 * cos_f) / r32(1.0 + cos_f))
    print(f"  norms torch {float(n0t):.9g} {float(n1t):.9g}  exact {math.sqrt(g00):.9g} {math.sqrt(g11):.9g}")
    print(f"  dot torch {float(dot_t):.9g} exact {dot64:.9g} (rel {float(dot_t) / dot64 - 1:+.2e}); "
          f"cos mk {float(cos_m):.9g} fr {cos_f:.9g}; t mk {float(t_mk):.9g} fr {t_fr:.9g} "
          f"({ulps32(float(t_mk), t_fr)} f32 ulps apart)")
    avg = sum(ws) / 2
    mk_rep = t_mk * avg + (1 - t_mk) * b
    cmp("replica of mergekit vs its saved output", mk_rep, ref)
    t = torch.tensor(t_fr, dtype=f32)
    fr_rep = t * avg + (1 - t) * b
    r, _ = compare_tensor(fr_rep.to(torch.bfloat16), frout)
    print(f"  finrecipe statement vs its saved output: {r['differ']} differ")
    cmp("finrecipe statement vs mergekit", fr_rep, ref)
    t = torch.tensor(float(t_mk), dtype=f32)
    cmp("finrecipe op order with mergekit's t vs mergekit", t * avg + (1 - t) * b, ref)
    # proposal: torch's f32 norms (8 sequential lanes), the dot exact (f64) rounded to f32
    npt = r32(float(n0t) * float(n1t))
    cos_p = r32(min(max(r32(r32(dot64) / max(npt, r32(1e-6))), -1.0), 1.0))
    t_p = r32(r32(2.0 * cos_p) / r32(1.0 + cos_p))
    t = torch.tensor(t_p, dtype=f32)
    print(f"  proposal t {t_p:.9g} ({ulps32(float(t_mk), t_p)} f32 ulps from mergekit's)")
    cmp("proposal (torch f32 norms, exact dot) vs mergekit", t * avg + (1 - t) * b, ref)


def nuslerp(b, ws, ref, frout, t=0.5):
    v0, v1 = ws[0] - b, ws[1] - b
    n0t = torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    n1t = torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    u0, u1 = v0 / n0t, v1 / n1t
    cos_t = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    th = torch.acos(cos_t)
    sth = torch.sin(th)
    s0, s1 = torch.sin((1 - t) * th), torch.sin(t * th)
    mk_rep = b + (s0 * v0 + s1 * v1) / sth
    o64 = [v0.double(), v1.double()]
    g00, g11, g01 = float(torch.dot(o64[0], o64[0])), float(torch.dot(o64[1], o64[1])), float(torch.dot(o64[0], o64[1]))
    n0, n1 = math.sqrt(g00), math.sqrt(g11)
    cos = g01 / (n0 * n1)
    theta = math.acos(cos)
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    print(f"  norms torch {float(n0t):.9g} {float(n1t):.9g} exact {n0:.9g} {n1:.9g} (rel {float(n0t) / n0 - 1:+.2e} {float(n1t) / n1 - 1:+.2e})")
    print(f"  cos mk {float(cos_t):.9g} exact {cos:.9g}; theta mk {float(th):.9g} exact {theta:.9g}; "
          f"coefficients mk s0/sinθ {float(s0 / sth):.9g} s1/sinθ {float(s1 / sth):.9g} fr {r32(c0):.9g} {r32(c1):.9g} "
          f"({ulps32(float(s0 / sth), r32(c0))}, {ulps32(float(s1 / sth), r32(c1))} f32 ulps apart)")
    cmp("replica of mergekit vs its saved output", mk_rep, ref)
    fr_rep = b + (torch.tensor(r32(c0), dtype=f32) * v0 + torch.tensor(r32(c1), dtype=f32) * v1)
    r, _ = compare_tensor(fr_rep.to(torch.bfloat16), frout)
    print(f"  finrecipe statement vs its saved output: {r['differ']} differ")
    cmp("finrecipe statement vs mergekit", fr_rep, ref)
    # mergekit's operation order, finrecipe's exact scalars rounded once to f32
    S0, S1, ST = (torch.tensor(r32(x), dtype=f32) for x in (math.sin((1 - t) * theta), math.sin(t * theta), math.sin(theta)))
    cmp("mergekit op order with exact scalars (f32) vs mergekit", b + (S0 * v0 + S1 * v1) / ST, ref)
    cmp("finrecipe op order with mergekit's f32 coefficients vs mergekit",
        b + ((s0 / sth) * v0 + (s1 / sth) * v1), ref)
    # proposal: torch's f32 norms (8 sequential lanes), cos = G01 / (n0 n1) from the exact Gram sum
    # (f64) rounded to f32, then mergekit's f32 scalar chain and its elementwise order
    cp = torch.tensor(min(max(g01 / (float(n0t) * float(n1t)), -1.0), 1.0), dtype=f32)
    thp = torch.acos(cp)
    P0, P1, PT = torch.sin((1 - t) * thp), torch.sin(t * thp), torch.sin(thp)
    print(f"  proposal cos {float(cp):.9g} ({ulps32(float(cp), float(cos_t))} f32 ulps from mergekit's), "
          f"theta {ulps32(float(thp), float(th))} ulps")
    cmp("proposal (torch f32 norms, exact Gram cos, mergekit's f32 chain and order) vs mergekit",
        b + (P0 * v0 + P1 * v1) / PT, ref)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=["model_stock", "nuslerp"])
    ap.add_argument("mergekit", type=Path)
    ap.add_argument("finrecipe", type=Path)
    ap.add_argument("tensors", nargs="+")
    ap.add_argument("--models", type=Path, default=DEF_MODELS)
    args = ap.parse_args()
    mk, fr = tensor_files(args.mergekit), tensor_files(args.finrecipe)
    for name in args.tensors:
        b = load(args.models, "base", name)
        ws = [load(args.models, w, name) for w in ("instruct", "cpt")]
        with safe_open(str(mk[name]), "pt") as h:
            ref = h.get_tensor(name).reshape(-1)
        with safe_open(str(fr[name]), "pt") as h:
            frout = h.get_tensor(name).reshape(-1)
        print(f"== {args.method} {name} ({b.numel():,} elements, torch threads {torch.get_num_threads()})")
        (model_stock if args.method == "model_stock" else nuslerp)(b, ws, ref, frout)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
