#!/usr/bin/env python
"""Per-tensor comparison of two merge outputs (e.g. mergekit's and finrecipe's for one config).

Usage: .venv-mergekit/bin/python bench/fullsize/compare.py DIR_A DIR_B [--top N] [--json OUT]

For every tensor present in both: elements that differ, that differ by more than 1 bf16 ulp, the
largest ulp distance and where it sits (flat index, both values, the tensor's max |value|), and how
many of the > 1 ulp elements are within 2^-20 of that max magnitude (f32 noise near zero). Tensors
are read one at a time (safetensors, memory-mapped), so two 0.84B outputs fit in little memory.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_files(d: Path):
    """name -> file for a safetensors output directory (sharded or not)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def ordered(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns on a monotone integer line (ulp distance = difference; +0 == -0)."""
    i = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def compare_tensor(x: torch.Tensor, y: torch.Tensor):
    x = x.reshape(-1).to(torch.bfloat16)
    y = y.reshape(-1).to(torch.bfloat16)
    d = (ordered(x) - ordered(y)).abs()
    differ = d != 0
    nd = int(differ.sum())
    res = {"numel": x.numel(), "differ": nd, "beyond1": 0, "max_ulp": 0}
    if nd == 0:
        return res, None
    far = d > 1
    res["beyond1"] = int(far.sum())
    mx = int(d.max())
    res["max_ulp"] = mx
    amax = float(torch.maximum(x.float().abs().max(), y.float().abs().max()))
    res["absmax"] = amax
    if res["beyond1"]:
        diff = (x.float() - y.float()).abs()
        res["beyond1_noise"] = int((far & (diff <= amax * 2.0**-20)).sum())
        j = int(d.argmax())
        res["worst"] = {"index": j, "a": float(x[j]), "b": float(y[j])}
        # relative size of the disagreement for the > 1 ulp elements (a scalar factor shows as a
        # constant ratio)
        xf, yf = x.float()[far], y.float()[far]
        res["median_rel"] = float(((xf - yf).abs() / yf.abs().clamp(min=1e-30)).median())
    return res, d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--top", type=int, default=20, help="tensors listed (most > 1 ulp first)")
    ap.add_argument("--json", type=Path, help="write all per-tensor rows here")
    args = ap.parse_args()
    fa, fb = tensor_files(args.a), tensor_files(args.b)
    missing = sorted(set(fa) ^ set(fb))
    rows = {}
    tot = {"numel": 0, "differ": 0, "beyond1": 0, "beyond1_noise": 0}
    for name in sorted(set(fa) & set(fb)):
        with safe_open(str(fa[name]), "pt") as ha, safe_open(str(fb[name]), "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.shape != y.shape:
            missing.append(name)
            continue
        r, _ = compare_tensor(x, y)
        rows[name] = r
        for k in tot:
            tot[k] += r.get(k, 0)
    print(f"{len(rows)} tensors compared; {tot['numel']:,} elements, {tot['differ']:,} differ, "
          f"{tot['beyond1']:,} beyond 1 ulp ({tot['beyond1_noise']:,} of them within 2^-20 of the tensor's max)")
    if missing:
        print(f"name/shape mismatches: {missing}")
    worst = sorted(rows.items(), key=lambda kv: (-kv[1]["beyond1"], -kv[1]["differ"]))
    for name, r in worst[: args.top]:
        if not r["differ"]:
            break
        extra = ""
        if r["beyond1"]:
            extra = (f" max {r['max_ulp']} ulp at {r['worst']['index']} ({r['worst']['a']:.6g} vs {r['worst']['b']:.6g}),"
                     f" median rel {r['median_rel']:.3g}, noise {r['beyond1_noise']}")
        print(f"  {name}: {r['numel']:,} el, {r['differ']:,} differ, {r['beyond1']:,} > 1 ulp{extra}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "total": tot, "mismatched": missing}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
