"""Verdicts for one config: finrecipe's output directory against mergekit's (and the inputs).

Rules (matrix.py names them per case):
  exact   every element within 1 bf16 ulp of mergekit's value (ulp taken at the larger magnitude), or
          (counted as explained) within 2^-20 of the tensor's largest magnitude: f32 rounding noise
          where terms cancel to nearly zero.
  topk    as exact, except elements that are proven to sit on a selection tie: some donor's |delta|
          equals a magnitude whose equal-valued run straddles the kept/dropped boundary of the
          sort, and recomputing the element with that donor kept or dropped (every combination
          of the ambiguous donors, same operation order and dtype as mergekit) reproduces
          finrecipe's value within 1 ulp; mergekit's own value must be reproduced too (otherwise
          the element counts as unexplained: the checker's model of the method would be wrong).
  random  masks are seeded differently by design, so the output is decomposed: every element must
          equal the value of some keep-mask combination of the donors (within 1 ulp) with the L1
          rescaling factor that this mask implies for the whole tensor; the kept fraction of each
          donor must be within 5 standard deviations of its binomial expectation (per tensor, and
          for DELLA separately for the low- and high-magnitude halves of each row's ranks).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizer_cases import TOKENIZER_KEYS, check_tokenizer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# mergekit 0.1.5 defaults of the generalized task-arithmetic family (its registry): normalize, rescale,
# sparsification, consensus.
GTA = {
    "task_arithmetic": (False, False, None, False),
    "ties": (True, False, "magnitude", True),
    "dare_linear": (False, True, "random", False),
    "dare_ties": (False, True, "random", True),
    "breadcrumbs": (False, False, "outliers", False),
    "breadcrumbs_ties": (False, False, "outliers", True),
    "della": (True, True, "della", True),
    "della_linear": (False, True, "della", False),
}
DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0, "int8_mask": False}


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$")


def to_fused_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral checkpoint layout -> the transformers 5 layout mergekit 0.1.5 merges and writes.

    Per expert e: w1 (gate) and w3 (up) become rows [gate; up] of `mlp.experts.gate_up_proj[e]`,
    w2 becomes `mlp.experts.down_proj[e]`; the router `block_sparse_moe.gate` becomes `mlp.gate`.
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in tensors.items():
        mt = _EXPERT.match(name)
        if mt:
            groups.setdefault(mt.group(1), {})[(int(mt.group(2)), mt.group(3))] = t
        else:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for prefix, g in groups.items():
        n = 1 + max(e for e, _ in g)
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g[(e, "1")], g[(e, "3")]]) for e in range(n)])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([g[(e, "2")] for e in range(n)])
    return out


def load_like(d: Path, ref_names: set[str]) -> dict[str, torch.Tensor]:
    """A model directory's tensors, in mergekit's fused-expert layout when the reference uses it."""
    t = load_dir(d)
    if any(n.endswith(".experts.gate_up_proj") for n in ref_names) and any(_EXPERT.match(n) for n in t):
        t = to_fused_experts(t)
    return t


def ulps(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|ours - ref| in units of the bf16 ulp at max(|ours|, |ref|) (float64; NaN pairs are 0)."""
    a, b = ours.double(), ref.double()
    mag = torch.maximum(a.abs(), b.abs()).clamp(min=2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    d = (a - b).abs() / ulp
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, torch.zeros_like(d), d)
    return torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)


# -- parameter resolution (mergekit's rules: filters first match, gradients over the layer index) -------------

def evaluate(setting: Any, name: str, t: float) -> Any:
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for rule in setting:
            f = rule.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(rule["value"], name, t)
        return None
    if isinstance(setting, list):
        if len(setting) == 1:
            return setting[0]
        s = t * (len(setting) - 1)
        i0 = int(s)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def layer_t(name: str, n_layers: int) -> float:
    mt = re.search(r"\.layers\.(\d+)\.", name)
    if not mt:
        return 0.0
    return int(mt.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


@dataclass
class Donor:
    path: str
    params: dict[str, Any]


def resolve(cfg: dict[str, Any], donors: list[Donor], name: str, n_layers: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    t = layer_t(name, n_layers)
    glob = cfg.get("parameters") or {}
    shared: dict[str, Any] = {}
    for k in ("lambda", "normalize", "rescale", "int8_mask"):
        if k in glob:
            shared[k] = evaluate(glob[k], name, t)
    per: list[dict[str, Any]] = []
    for d in donors:
        p: dict[str, Any] = {}
        for k in ("weight", "density", "gamma", "epsilon"):
            for scope in (d.params, glob):
                if k in scope:
                    v = evaluate(scope[k], name, t)
                    if v is not None:
                        p[k] = v
                        break
            p.setdefault(k, DEFAULTS.get(k))
        per.append(p)
    return shared, per


# -- the generalized task-arithmetic combination with explicit masks (mergekit's operation order) ----------

def gta_combine(base: torch.Tensor, deltas: list[torch.Tensor], masks: list[torch.Tensor],
                scales: list[torch.Tensor | None], weights: list[float], *, consensus: bool,
                normalize: bool, lam: float, int8_mask: bool) -> torch.Tensor:
    """Elementwise: inputs of shape [E] in the compute dtype (masks 0/1 in that dtype)."""
    dt = base.dtype
    sparse = []
    for d, mk, s in zip(deltas, masks, scales, strict=True):
        x = d * mk
        if s is not None:
            x = x * s
        sparse.append(x)
    stacked = torch.stack(sparse)
    w = torch.tensor(weights, dtype=dt).unsqueeze(-1)
    stacked = stacked * w
    if consensus:
        mdt = torch.int8 if int8_mask else dt
        sign = stacked.sign().to(mdt)
        majority = (stacked.sum(dim=0) >= 0).to(mdt) * 2 - 1
        mask = sign == majority
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(dt)


def kept_range(n: int, density: float, gamma: float, kind: str) -> tuple[int, int]:
    """[start, end) of the kept ranks in ascending |delta| order."""
    if density >= 1:
        return 0, n
    if kind == "magnitude":
        if density <= 0:
            return n, n
        k = max(1, int(density * n))
        return n - k, n
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return n_bot, n_bot + target


def tie_states(delta: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced keep mask, ambiguous mask) over the flattened tensor."""
    v = delta.abs().reshape(-1).float()
    asc = torch.sort(v).values
    lo = torch.searchsorted(asc, v, right=False)
    hi = torch.searchsorted(asc, v, right=True)
    keep = (lo >= start) & (hi <= end)
    drop = (hi <= start) | (lo >= end)
    return keep, ~(keep | drop)


@dataclass
class Result:
    verdict: str
    differing: int = 0
    beyond: int = 0
    explained: int = 0
    unexplained: int = 0
    total: int = 0
    max_ulps: float = 0.0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def compare(cfg: dict[str, Any], rule: str, ours_dir: Path, ref_dir: Path, mk_f32_promotion: bool = False) -> Result:
    ref = load_dir(ref_dir)
    ours = load_like(ours_dir, set(ref))
    tok_note = ""
    if TOKENIZER_KEYS & set(cfg):  # tokenizer_cases.py: tokenizer files, then rows in mergekit's token order
        problem, ours, tok_note = check_tokenizer(ours_dir, ref_dir, ours)
        if problem:
            return Result("FAIL", detail=problem)
    if set(ours) != set(ref):
        missing = sorted(set(ref) - set(ours))[:3]
        extra = sorted(set(ours) - set(ref))[:3]
        return Result("FAIL", detail=f"tensor names differ: missing {missing}, extra {extra}")
    res = Result("pass", detail=tok_note)
    for name in sorted(ref):
        a, b = ours[name], ref[name]
        if a.dtype != b.dtype and b.dtype == torch.float32 and mk_f32_promotion:
            # mergekit's result was promoted to float32 and written so although the config says
            # bfloat16 (documented as a mergekit bug); compared at the dtype the config asks for
            ref[name] = b = b.to(a.dtype)
        if a.shape != b.shape or a.dtype != b.dtype:
            return Result("FAIL", detail=f"{name}: {a.dtype}{list(a.shape)} vs mergekit {b.dtype}{list(b.shape)}")
        res.total += b.numel()
        res.differing += int((a.view(-1) != b.view(-1)).sum())
    if rule == "random":
        own = check_random(cfg, ref, ref, Result("pass"))
        if own.verdict != "pass":  # the checker must accept mergekit's own output
            return Result("checker-error", detail=f"mergekit's own output fails the random rule: {own.detail}"
                          f" ({own.unexplained} unexplained)")
        return check_random(cfg, ours, ref, res)
    inputs = None
    for name in sorted(ref):
        a, b = ours[name], ref[name]
        u = ulps(a, b)
        res.max_ulps = max(res.max_ulps, float(u.max()) if u.numel() else 0.0)
        bad = (u > 1).reshape(-1)
        nb = int(bad.sum())
        if not nb:
            continue
        res.beyond += nb
        if rule == "topk":
            if inputs is None:
                inputs = Inputs(cfg)
            ok = inputs.explain_topk(name, a.reshape(-1)[bad], b.reshape(-1)[bad], bad)
            res.explained += ok
            res.unexplained += nb - ok
        else:
            # f32 noise: where the terms of a combination cancel, a few f32 roundings of the operands
            # (e.g. slerp's coefficients, computed by mergekit in f32 and here in f64) are many bf16
            # ulps of the tiny result; explained when below 2^-20 of the tensor's largest magnitude
            floor = 2.0 ** -20 * float(b.abs().max())
            ok = int(((a.double() - b.double()).abs().reshape(-1)[bad] <= floor).sum())
            res.explained += ok
            res.unexplained += nb - ok
    res.verdict = "pass" if res.unexplained == 0 else "FAIL"
    return res


class Inputs:
    """Input tensors and resolved parameters of a `models:` config (top-k and random checks)."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.method = cfg["merge_method"]
        self.base_path = cfg["base_model"]
        self.donors = [Donor(x["model"], x.get("parameters") or {}) for x in cfg["models"]
                       if x["model"] != self.base_path]
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        conf = json.loads((Path(self.base_path) / "config.json").read_text())
        self.n_layers = int(conf["num_hidden_layers"])
        self.dt = TORCH_DTYPES[cfg.get("dtype", "float32")]
        self.out_dt = TORCH_DTYPES[cfg.get("out_dtype", cfg.get("dtype", "float32"))]

    def tensor(self, path: str, name: str) -> torch.Tensor:
        if path not in self._cache:
            t = load_dir(Path(path))
            self._cache[path] = to_fused_experts(t) if any(_EXPERT.match(n) for n in t) else t
        return self._cache[path][name]

    def setup(self, name: str) -> dict[str, Any]:
        normalize, rescale, sparsify, consensus = GTA[self.method]
        shared, per = resolve(self.cfg, self.donors, name, self.n_layers)
        base = self.tensor(self.base_path, name).to(self.dt)
        deltas = [self.tensor(d.path, name).to(self.dt) - base for d in self.donors]
        return dict(normalize=bool(shared.get("normalize", normalize)), rescale=bool(shared.get("rescale", rescale)),
                    lam=float(shared.get("lambda", 1.0)), int8=bool(shared.get("int8_mask", False)),
                    sparsify=sparsify, consensus=consensus, per=per, base=base, deltas=deltas)

    def explain_topk(self, name: str, ours: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> int:
        """Elements beyond 1 ulp explained by selection ties: both outputs are reproduced by one keep
        choice for each donor whose |delta| sits in the equal-valued run straddling its top-k cut.

        Mixtral's fused expert tensors (`mlp.experts.gate_up_proj`, `down_proj`): mergekit selects over
        the fused tensor, finrecipe over each expert tensor of the checkpoint (docs/merge-plan.md), so
        there finrecipe's value is reproduced from per-expert selections and mergekit's from the fused
        one: an element is explained when each tool's value is its own rule's (ties included)."""
        if self.method not in GTA:
            fn = EXPLAIN.get(self.method)
            return fn(self, name, ours, ref, where) if fn else 0
        s = self.setup(name)
        if s["sparsify"] not in ("magnitude", "outliers"):
            return 0
        base = s["base"].reshape(-1)[where]
        dsel = [d.reshape(-1)[where] for d in s["deltas"]]
        ref_states = self._topk_states(s, where, moe_parts(name, s["deltas"][0].shape))
        parts = moe_parts(name, s["deltas"][0].shape, per_expert=True)
        if parts == 1:
            return int((self._topk_match(s, base, dsel, ref_states, ours, tie_only=True)
                        & self._topk_match(s, base, dsel, ref_states, ref, tie_only=False)).sum())
        ours_states = self._topk_states(s, where, parts)
        return int((self._topk_match(s, base, dsel, ours_states, ours, tie_only=False)
                    & self._topk_match(s, base, dsel, ref_states, ref, tie_only=False)).sum())

    def _topk_states(self, s: dict[str, Any], where: torch.Tensor, parts: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]]:
        """Per donor, at `where`: (forced keep, ambiguous, rescale factor variants), each selection made
        over `parts` equal consecutive blocks of the flattened tensor (1: the whole tensor)."""
        out = []
        for d, p in zip(s["deltas"], s["per"], strict=True):
            flat = d.reshape(-1)
            blk = flat.numel() // parts
            keeps, ambs, facs = [], [], []
            for j in range(parts):
                seg = flat[j * blk:(j + 1) * blk]
                n = seg.numel()
                st, en = kept_range(n, float(p["density"]), float(p["gamma"]), s["sparsify"])
                keep, amb = tie_states(seg, st, en)
                keeps.append(keep)
                ambs.append(amb)
                scale = None
                if s["rescale"] and float(p["density"]) < 1:
                    # L1 of the kept set does not depend on how ties are broken (tied values are equal).
                    order = torch.sort(seg.abs().float(), stable=True).indices
                    m = torch.zeros(n, dtype=seg.dtype)
                    m[order[st:en]] = 1
                    before, after = seg.abs().sum(), (seg * m).abs().sum()
                    if not (before < 1e-7 or after < 1e-7):
                        scale = before / after
                facs.append(scale)
            if parts == 1:
                sc = facs[0]
                variants: list[torch.Tensor | None] = [sc]
                if sc is not None:
                    # bf16 compute: torch's bf16 sum is not correctly rounded (it can be a bf16 ulp off
                    # the exact sum), so a rescale factor r(r(L1)/r(L1 kept)) may legitimately be its bf16
                    # neighbour (f32: sums in another order may move the factor by an f32 ulp)
                    if self.dt == torch.bfloat16:
                        variants = [sc, bf16_step(sc, 1), bf16_step(sc, -1)]
                    else:
                        variants = [sc, torch.nextafter(sc, torch.tensor(math.inf)),
                                    torch.nextafter(sc, torch.tensor(-math.inf))]
            elif any(f is not None for f in facs):
                variants = [torch.cat([torch.full((blk,), float(f if f is not None else 1.0), dtype=self.dt)
                                       for f in facs])[where]]
            else:
                variants = [None]
            out.append((torch.cat(keeps)[where], torch.cat(ambs)[where], variants))
        return out

    def _topk_match(self, s: dict[str, Any], base: torch.Tensor, dsel: list[torch.Tensor],
                    states: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]],
                    x: torch.Tensor, *, tie_only: bool) -> torch.Tensor:
        """Where some keep choice allowed by `states` (and a factor variant) reproduces x within 1 ulp;
        with tie_only, only choices that use an ambiguous donor or a factor variant count."""
        nd = len(dsel)
        hit = torch.zeros(x.numel(), dtype=torch.bool)
        any_amb = torch.zeros_like(hit)
        for _, amb, _ in states:
            any_amb |= amb
        for combo, svar in itertools.product(itertools.product((0, 1), repeat=nd),
                                             itertools.product(*[v for _, _, v in states])):
            masks, valid = [], torch.ones(x.numel(), dtype=torch.bool)
            for i, c in enumerate(combo):
                keep, amb, _ = states[i]
                # a forced donor takes its forced state; an ambiguous one takes the combo's choice
                want = torch.full_like(keep, bool(c))
                valid &= amb | (keep == want)
                masks.append(torch.where(amb, want, keep).to(self.dt))
            cand = gta_combine(base, dsel, masks, list(svar), [float(p["weight"]) for p in s["per"]],
                               consensus=s["consensus"], normalize=s["normalize"], lam=s["lam"],
                               int8_mask=s["int8"]).to(self.out_dt)
            ok = valid & (ulps(x, cand) <= 1)
            if tie_only:
                varied = any(v is not None and v0[0] is not None and float(v) != float(v0[0])
                             for v, (_, _, v0) in zip(svar, states, strict=True))
                ok &= any_amb | varied
            hit |= ok
        return hit


def moe_parts(name: str, shape: torch.Size, per_expert: bool = False) -> int:
    """How many tensors of the checkpoint a fused Mixtral expert tensor holds, in order (per expert
    e: gate_up_proj[e] = [w1; w3], down_proj[e] = w2): what finrecipe selects over separately
    (`per_expert`); 1 otherwise, and for mergekit, which selects over the fused tensor."""
    if not per_expert or len(shape) != 3:
        return 1
    if name.endswith(".mlp.experts.gate_up_proj"):
        return 2 * shape[0]
    if name.endswith(".mlp.experts.down_proj"):
        return shape[0]
    return 1


EXPLAIN: dict[str, Any] = {}


def bf16_step(x: torch.Tensor, k: int) -> torch.Tensor:
    """The bf16 number k representable steps from the positive bf16 number x."""
    bits = int(x.to(torch.bfloat16).view(torch.int16)) + k
    return torch.tensor(bits, dtype=torch.int16).view(torch.bfloat16)


def fit_scale(out: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, weight: float,
              s: dict[str, Any]) -> torch.Tensor:
    """The rescale factor of one donor, read off the elements that this donor alone moves.

    r = (out - base) / (lambda * delta * w) is the factor where only this donor contributes (with
    normalize the divisor is w itself), anything else elsewhere; the mode of r is found by medians
    over shrinking windows, starting from 1 / density's neighbourhood.
    """
    sel = delta.abs() > 0
    r = (out.double() - base.double())[sel] / (s["lam"] * delta.double()[sel] * (1.0 if s["normalize"] else weight))
    r = r[(r > 0.5) & (r < 100)]
    if not r.numel():
        return torch.tensor(1.0, dtype=base.dtype)
    m = float(r.median())
    for width in (0.2, 0.02, 0.002, 0.0002):
        w = r[(r - m).abs() <= width * m]
        if not w.numel():
            break
        m = float(w.median())
    return torch.tensor(m, dtype=base.dtype)


def classify(out: torch.Tensor, base: torch.Tensor, deltas: list[torch.Tensor], dens: list[float],
             weights: list[float], s: dict[str, Any], scales: list[torch.Tensor | None]
             ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Per element: the best ulp distance over all keep-mask combinations, and per donor whether its
    mask is known (the combinations keeping it and those dropping it do not reproduce the element
    equally well) and kept (the nearer side keeps it)."""
    nd = len(deltas)
    combos = list(itertools.product((0, 1), repeat=nd))
    best = torch.full((out.numel(),), math.inf, dtype=torch.float64)
    us = []
    for combo in combos:
        masks = [torch.full_like(base, float(c)) if dens[i] < 1 else torch.ones_like(base)
                 for i, c in enumerate(combo)]
        cand = gta_combine(base, deltas, masks, scales, weights, consensus=s["consensus"],
                           normalize=s["normalize"], lam=s["lam"], int8_mask=s["int8"]).to(out.dtype)
        u = ulps(out, cand)
        us.append(u)
        best = torch.minimum(best, u)
    known, kept = [], []
    for i in range(nd):
        u1 = torch.stack([u for u, c in zip(us, combos, strict=True) if c[i]]).min(dim=0).values
        u0 = torch.stack([u for u, c in zip(us, combos, strict=True) if not c[i]]).min(dim=0).values
        known.append(u1 != u0)
        kept.append(u1 < u0)
    return best, known, kept


def keep_prob(s: dict[str, Any], d: torch.Tensor, shape: torch.Size, density: float, epsilon: float) -> torch.Tensor:
    """Each element's keep probability (float64, flat): the density (DARE), or DELLA's
    density - ε + 2ε·(rank of |d| in its row) / (columns - 1)."""
    if s["sparsify"] != "della":
        return torch.full((d.numel(),), density, dtype=torch.float64)
    x = d.reshape(shape)
    x = x.unsqueeze(0) if x.dim() < 2 else x
    rows = x.abs().reshape(x.shape[0], -1).float()
    ranks = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1).double()
    ncol = rows.shape[1]
    rn = ranks / (ncol - 1) if ncol > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + rn * 2 * epsilon).reshape(-1)


def check_random(cfg: dict[str, Any], ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                 res: Result) -> Result:
    inp = Inputs(cfg)
    worst_z, worst_scale = 0.0, 0.0
    kept_tot = [0.0] * len(inp.donors)
    exp_tot = [0.0] * len(inp.donors)
    var_tot = [0.0] * len(inp.donors)
    halves = [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0] for _ in inp.donors]  # low: kept, exp, var; high: ...
    notes: list[str] = []
    for name in sorted(ref):
        s = inp.setup(name)
        out = ours[name].reshape(-1)
        base = s["base"].reshape(-1)
        deltas = [d.reshape(-1) for d in s["deltas"]]
        per = s["per"]
        nd = len(deltas)
        dens = [float(p["density"]) for p in per]
        eps = [float(p["epsilon"]) for p in per]
        weights = [float(p["weight"]) for p in per]
        if all(d >= 1 for d in dens):
            u = ulps(out, ref[name].reshape(-1))
            res.unexplained += int((u > 1).sum())
            continue
        # 1. classify each element by the mask combination that reproduces it, refining the scales
        scales: list[torch.Tensor | None] = [
            fit_scale(out, base, deltas[i], weights[i], s) if s["rescale"] and dens[i] < 1 else None
            for i in range(nd)]
        hidden = [False] * nd
        for _ in range(6):
            best, known, kept = classify(out, base, deltas, dens, weights, s, scales)
            new_scales: list[torch.Tensor | None] = []
            for i, d in enumerate(deltas):
                if scales[i] is None:
                    new_scales.append(None)
                    continue
                amb_l1 = (d.abs() * (~known[i]).to(d.dtype)).sum()
                after_known = (d * kept[i].to(d.dtype)).abs().sum()
                hidden[i] = float(amb_l1) > 1e-3 * float(after_known)
                if hidden[i]:
                    # sign election hides some masks: keep the scale fitted to the elements this donor
                    # alone moves (checked below against the bounds the known masks allow)
                    new_scales.append(scales[i])
                else:
                    new_scales.append(d.abs().sum() / after_known if float(after_known) >= 1e-7 else None)
            if all((a is None and b is None) or (a is not None and b is not None and float(a) == float(b))
                   for a, b in zip(scales, new_scales, strict=True)):
                break
            scales = new_scales
            best, known, kept = classify(out, base, deltas, dens, weights, s, scales)
        laddered = [False] * nd
        for i in range(nd):
            cur = scales[i]
            if cur is None or inp.dt == torch.float32 or not bool((best > 1).any()):
                continue
            # bf16 compute: mergekit's factor is r(r(Σ|d|) / r(Σ|d·m|)), a bf16 number from bf16 sums, and
            # the mask's ambiguous elements (those whose keep/drop gives the same output) leave the
            # recomputed one a bf16 step or two away; where it leaves elements unexplained, take the bf16
            # neighbour (up to 3 steps) that reproduces the most (checked below against the mask's bounds)
            ladder = [cur] + [bf16_step(cur, k) for k in (1, -1, 2, -2, 3, -3)]
            scored = []
            for cand in ladder:
                trial = list(scales)
                trial[i] = cand
                scored.append((int((classify(out, base, deltas, dens, weights, s, trial)[0] > 1).sum()),
                               abs(float(cand) - float(cur)), cand))
            scales[i] = min(scored, key=lambda x: (x[0], x[1]))[2]
            laddered[i] = float(scales[i]) != float(cur)
            best, known, kept = classify(out, base, deltas, dens, weights, s, scales)
        for i, d in enumerate(deltas):
            # (tiny tensors, e.g. bf16 norm weights with a handful of nonzero deltas, leave the mask too
            # ambiguous for the bounds to mean anything: checked from 1024 nonzero deltas on)
            if scales[i] is not None and (hidden[i] or laddered[i]) and int((d != 0).sum()) >= 1024:
                before = float(d.abs().sum())
                amb = ~known[i]
                amb_l1 = float((d.abs() * amb.to(d.dtype)).sum())
                after_known = float((d * kept[i].to(d.dtype)).abs().sum())
                # the kept part of the ambiguous L1: each hidden mask entry is an independent draw with
                # its keep probability p (which of a donor's masks sign election hides depends on the
                # other donors' masks, not on its own), so it lies within 5σ of Σ p·|d| (σ² = Σ p(1-p)·d²)
                # as well as within [0, amb_l1]
                pa = keep_prob(s, d, ours[name].shape, dens[i], eps[i])[amb]
                da = d.double().abs()[amb]
                mean, sd = float((pa * da).sum()), math.sqrt(float((pa * (1 - pa) * da * da).sum()))
                amb_lo, amb_hi = max(0.0, mean - 5 * sd), min(amb_l1, mean + 5 * sd)
                lo_s, hi_s = before / max(after_known + amb_hi, 1e-30), before / max(after_known + amb_lo, 1e-30)
                sc = float(scales[i])  # type: ignore[arg-type]
                tol = 1e-5 if inp.dt == torch.float32 else 2.0 ** -6
                if not (lo_s * (1 - tol) <= sc <= hi_s * (1 + tol)):
                    notes.append(f"{name}: rescale {sc:.6g} outside the bounds [{lo_s:.6g}, {hi_s:.6g}] of its mask")
        bad = best > 1
        res.unexplained += int(bad.sum())
        res.explained += int(out.numel() - int(bad.sum()))
        # 2. kept fractions vs binomial expectation (informative: mask known and delta nonzero)
        for i, d in enumerate(deltas):
            if dens[i] >= 1:
                continue
            info = known[i] & (d != 0)
            p = keep_prob(s, d, ours[name].shape, dens[i], eps[i])
            k = float(kept[i][info].sum())
            e = float(p[info].sum())
            v = float((p[info] * (1 - p[info])).sum())
            z = (k - e) / math.sqrt(v) if v > 0 else 0.0
            worst_z = max(worst_z, abs(z))
            kept_tot[i] += k
            exp_tot[i] += e
            var_tot[i] += v
            if s["sparsify"] == "della":
                low = info & (p < dens[i])
                high = info & (p >= dens[i])
                for j, sel in ((0, low), (3, high)):
                    halves[i][j] += float(kept[i][sel].sum())
                    halves[i][j + 1] += float(p[sel].sum())
                    halves[i][j + 2] += float((p[sel] * (1 - p[sel])).sum())
            if scales[i] is not None and float(d.abs().sum()) > 0:
                exact = float(d.abs().sum()) / max(float((d * kept[i].to(d.dtype)).abs().sum()), 1e-30)
                worst_scale = max(worst_scale, abs(float(scales[i]) / exact - 1))
    zs = [(k - e) / math.sqrt(v) for k, e, v in zip(kept_tot, exp_tot, var_tot, strict=True) if v > 0]
    hz = []
    for h in halves:
        for j in (0, 3):
            if h[j + 2] > 0:
                hz.append((h[j] - h[j + 1]) / math.sqrt(h[j + 2]))
    res.extra = {"kept": [round(k / e, 4) if e else None for k, e in zip(kept_tot, exp_tot, strict=True)],
                 "z_model": [round(z, 2) for z in zs], "z_tensor_max": round(worst_z, 2),
                 "z_della_halves": [round(z, 2) for z in hz]}
    if worst_z > 5 or any(abs(z) > 5 for z in zs + hz):
        notes.append(f"kept fraction outside binomial bounds (|z| max {max([worst_z] + [abs(z) for z in zs + hz]):.1f})")
    res.verdict = "pass" if res.unexplained == 0 and not notes else "FAIL"
    res.detail = "; ".join(notes)
    return res


# -- sce (select_topk < 1) and arcee_fusion: threshold ties of their selections ---------------------------------

def _global_param(inp: Inputs, name: str, key: str, default: Any) -> Any:
    glob = inp.cfg.get("parameters") or {}
    v = evaluate(glob[key], name, layer_t(name, inp.n_layers)) if key in glob else None
    return default if v is None else v


def _close(x: torch.Tensor, cands: list[torch.Tensor]) -> torch.Tensor:
    ok = torch.zeros(x.numel(), dtype=torch.bool)
    for c in cands:
        ok |= ulps(x, c) <= 1
    return ok


def _sce_out(base: torch.Tensor, tvs: torch.Tensor, keep: torch.Tensor, wkeep: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's sce combination (its operation order) with the element mask `keep`, its
    weights taken from the task vectors masked by `wkeep` (the selection the whole tensor used)."""
    wt = tvs * wkeep.to(tvs.dtype).unsqueeze(0)
    w = wt.square().reshape(wt.shape[0], -1).mean(dim=1)
    ws = float(torch.sum(w).item())
    w = torch.ones_like(w) / w.shape[0] if abs(ws) < 1e-6 else w / ws
    tvs = tvs * keep.to(tvs.dtype).unsqueeze(0)
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = (sign == majority).to(tvs.dtype)
    w = w.view(-1, *([1] * (tvs.dim() - 1))) * erase
    return base + (tvs * w).sum(dim=0) / torch.sum(w, dim=0).clamp(min=1e-6)


def explain_sce(inp: Inputs, name: str, ours: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> int:
    """Explained only when the k-th largest variance across the task vectors is shared by elements
    on both sides of the cut (so torch.topk may keep any of them): an element beyond 1 ulp is
    explained when finrecipe's value is the element computed with the weights of finrecipe's
    selection (lower index first among the tied) and mergekit's with the weights of torch.topk's
    selection, a tied element kept or dropped, any other in its own state (sce's weights are means
    over the masked task vectors, so which tied elements stay moves every element a little)."""
    topk = float(_global_param(inp, name, "select_topk", 1.0))
    if topk >= 1:
        return 0
    base = inp.tensor(inp.base_path, name).to(inp.dt)
    tvs = torch.stack([inp.tensor(d.path, name).to(inp.dt) - base for d in inp.donors])
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    k = int(torch.count_nonzero(var) * topk)
    if k == 0:
        return 0
    kth = torch.sort(var.float(), descending=True).values[k - 1].to(var.dtype)
    above, equal = int((var > kth).sum()), int((var == kth).sum())
    if above + equal <= k:
        return 0
    amb = (var == kth)[where]
    shape = base.shape
    ours_sel = var > kth
    ours_sel[torch.nonzero(var == kth).reshape(-1)[: k - above]] = True
    mk_sel = torch.zeros(var.numel(), dtype=torch.bool)
    mk_sel[torch.topk(var.abs(), k=k, largest=True).indices] = True
    every = torch.ones(var.numel(), dtype=torch.bool)

    state = (var > kth)[where]

    def ok(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        # a tied element kept or dropped; any other element in its own state, with the weights
        # that the tied selection `sel` implies (the weights depend on which tied elements stay)
        w = sel.reshape(shape)
        kept, dropped = (_sce_out(base, tvs, m.reshape(shape), w).to(inp.out_dt).reshape(-1)[where]
                         for m in (every, ~every))
        return (amb & _close(x, [kept, dropped])) | (~amb & torch.where(state, _close(x, [kept]), _close(x, [dropped])))

    return int((ok(ours, ours_sel) & ok(ref, mk_sel)).sum())


def _fusion(base: torch.Tensor, p: torch.Tensor, exact: bool) -> tuple[torch.Tensor, float]:
    """arcee_fusion's importance and threshold: mergekit's float32 operations, or (exact) the same
    float32 softmax probabilities with the KL summed in float64 (what finrecipe computes)."""
    diff = (p - base).abs()
    if exact:
        pp = (torch.softmax(p.double(), dim=-1).float() + 1e-8).double()
        qq = (torch.softmax(base.double(), dim=-1).float() + 1e-8).double()
        imp = (diff * torch.sum(pp * torch.log(pp / qq), dim=-1, keepdim=True).float()).reshape(-1)
    else:
        pp = torch.softmax(p, dim=-1) + 1e-8
        qq = torch.softmax(base, dim=-1) + 1e-8
        imp = (diff * torch.sum(pp * torch.log(pp / qq), dim=-1, keepdim=True)).reshape(-1)
    srt = torch.sort(imp).values
    q = (torch.tensor([0.25, 0.5, 0.75]) * (srt.numel() - 1)).long()
    q1, med, q3 = srt[q]
    return imp, float(med + 1.5 * (q3 - q1))


def explain_arcee_fusion(inp: Inputs, name: str, ours: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> int:
    """An element beyond 1 ulp is explained when its decision (importance ≥ threshold) flips between
    mergekit's float32 KL and the KL of the same probabilities summed exactly, and finrecipe's value
    is the exact decision's, mergekit's the float32 one's (for close models the KL is a small
    difference of large terms: torch's float32 KL is off by percents, which moves elements across the
    threshold); or when its exact importance equals the exact threshold (a tie, within 2^-20)."""
    if inp.dt != torch.float32:
        return 0  # bf16 rows: see the case's note
    base = inp.tensor(inp.base_path, name).to(inp.dt)
    p = inp.tensor(inp.donors[0].path, name).to(inp.dt)
    imp_mk, thr_mk = _fusion(base, p, exact=False)
    imp_ex, thr_ex = _fusion(base, p, exact=True)
    dec_mk = (imp_mk >= thr_mk)[where]
    dec_ex = (imp_ex >= thr_ex)[where]
    b = base.reshape(-1)[where]
    took = (b + (p - base).reshape(-1)[where]).to(inp.out_dt)
    kept = b.to(inp.out_dt)

    def is_(x: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return torch.where(dec, _close(x, [took]), _close(x, [kept]))

    flip = (dec_mk != dec_ex) & is_(ours, dec_ex) & is_(ref, dec_mk)
    tie = ((imp_ex[where].double() - thr_ex).abs() <= 2.0 ** -20 * abs(thr_ex)) & _close(ours, [took, kept]) \
        & _close(ref, [took, kept])
    return int((flip | tie).sum())


EXPLAIN.update(sce=explain_sce, arcee_fusion=explain_arcee_fusion)
