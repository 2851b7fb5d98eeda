"""The merge-method table: the one place that says what each merge method is.

Per method: its mergekit name, its parameters (scope "model": set per input model, e.g. `weight`;
scope "global": one value per tensor, e.g. `lambda`), their defaults (None: required) and valid
ranges, whether a base model is required, how many models it merges, and the Rust kernel that
executes it (`finrecipe._core.kernels()`). Config validation (`config.py`), the planner
(`plan.py`), the docs and the agreement check below read this table; nothing else names a method.

Adding a method is one `MethodDef` here, plus a kernel in `rust/src/merge/` when none of the
existing ones computes it. `check_kernels` runs at import of `finrecipe.merge`: a method whose
kernel is missing from the compiled core, or whose parameters differ from what the kernel reads,
is an error (rebuild the extension), as is a kernel no method uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from finrecipe.errors import FinrecipeError

Scope = Literal["model", "global"]


@dataclass(frozen=True)
class ParamDef:
    """One parameter of a merge method."""

    name: str
    scope: Scope
    default: float | bool | None = None  # None: required
    kind: type = float  # float or bool
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # upper bound (exclusive when hi_open)
    hi_open: bool = False
    kernel: bool = True  # False: accepted for mergekit compatibility, not passed to the kernel
    doc: str = ""

    @property
    def per_model(self) -> bool:
        return self.scope == "model"

    @property
    def range_text(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"[{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"

    def problem(self, value: Any) -> str | None:
        """Why `value` (one scalar of a setting) is not valid for this parameter, or None."""
        if self.kind is bool:
            if isinstance(value, bool) or value in (0, 1):
                return None
            return f"{self.name!r} is true/false, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name!r} is a number, got {value!r}"
        x = float(value)
        if not math.isfinite(x):
            return f"{self.name!r} must be a finite number, got {value!r}"
        if self.lo is not None and x < self.lo:
            return f"{self.name!r} must be within {self.range_text}, got {value!r}"
        if self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi):
            return f"{self.name!r} must be within {self.range_text}, got {value!r}"
        return None


@dataclass(frozen=True)
class MethodDef:
    """One merge method (mergekit's name and semantics)."""

    name: str
    kernel: str  # the Rust kernel that executes it
    params: tuple[ParamDef, ...]
    needs_base: bool  # True: `base_model` required; False: a base model is ignored (unless base_optional)
    min_sources: int = 1  # models besides the base
    max_sources: int | None = None
    # With normalize on, a zero sum of weights is an error (the kernel divides by it unguarded;
    # task-arithmetic kernels replace a zero divisor by 1, as mergekit does).
    refuse_zero_weight_sum: bool = False
    # An explicit copy: tensors of dtypes no arithmetic applies to (integers, FP8, ...) are copied
    # as they are instead of being refused.
    explicit_copy: bool = False
    # mergekit runs this method's torch operations in the config's `dtype`: with bfloat16 every step
    # rounds to bf16. The kernel can do the same (plan `compute_dtype: "BF16"`).
    bf16_compute: bool = False
    # With needs_base False: a `base_model`, when given, is used (the task vectors are interpolated
    # and the base added back) instead of ignored (mergekit's BasePolicy.OPTIONAL).
    base_optional: bool = False
    # A boolean global parameter that, when on, divides by the sum of the weights: a zero sum is
    # an error (multislerp's normalize_weights).
    zero_sum_flag: str | None = None
    doc: str = ""

    def param(self, name: str) -> ParamDef | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def kernel_params(self, scope: Scope) -> tuple[ParamDef, ...]:
        return tuple(p for p in self.params if p.kernel and p.scope == scope)


def _p(name: str, scope: Scope, default: float | bool | None = None, kind: type = float, *,
       lo: float | None = None, hi: float | None = None, hi_open: bool = False, kernel: bool = True,
       doc: str = "") -> ParamDef:
    return ParamDef(name, scope, default, kind, lo, hi, hi_open, kernel, doc)


WEIGHT = _p("weight", "model", doc="the model's weight")
DENSITY = _p("density", "model", 1.0, lo=0.0, hi=1.0, doc="fraction of the task vector kept")
GAMMA = _p("gamma", "model", 0.01, lo=0.0, hi=1.0, hi_open=True,
           doc="fraction of the largest |delta| dropped as outliers")
LAMBDA = _p("lambda", "global", 1.0, doc="scale of the merged task vector")
EPSILON = _p("epsilon", "model", 0.15, lo=0.0, hi=1.0,
             doc="DELLA: keep probabilities spread over density ± epsilon by magnitude rank")
RESCALE = _p("rescale", "global", True, bool, doc="rescale kept DARE deltas to the original L1 norm")
# mergekit accepts `rescale` for every task-arithmetic method; off by default where it prunes by magnitude.
RESCALE_OFF = _p("rescale", "global", False, bool, doc="rescale kept deltas to the original L1 norm")
# task_arithmetic prunes nothing, so mergekit's `rescale` has nothing to rescale: accepted, no effect.
RESCALE_NOOP = _p("rescale", "global", False, bool, kernel=False, doc="accepted, no effect (nothing is pruned)")
# mergekit's memory optimisation flag: accepted for compatibility, has no effect here.
INT8_MASK = _p("int8_mask", "global", False, bool, kernel=False, doc="accepted, no effect")


def normalize(default: bool) -> ParamDef:
    return _p("normalize", "global", default, bool, doc="divide by the sum of the weights")


METHODS: dict[str, MethodDef] = {m.name: m for m in (
    MethodDef("linear", "linear", (WEIGHT, normalize(True)), needs_base=False, refuse_zero_weight_sum=True,
              doc="weighted average of the models"),
    MethodDef("task_arithmetic", "task_arithmetic", (WEIGHT, LAMBDA, normalize(False), RESCALE_NOOP, INT8_MASK),
              needs_base=True, bf16_compute=True, doc="base + lambda * sum of weighted task vectors"),
    MethodDef("ties", "ties", (WEIGHT, DENSITY, LAMBDA, normalize(True), RESCALE_OFF, INT8_MASK), needs_base=True, bf16_compute=True,
              doc="top-k task vectors, sign election, disjoint mean"),
    MethodDef("dare_linear", "dare_linear", (WEIGHT, DENSITY, LAMBDA, normalize(False), RESCALE, INT8_MASK),
              needs_base=True, bf16_compute=True, doc="random drop and rescale, then task arithmetic"),
    MethodDef("dare_ties", "dare_ties", (WEIGHT, DENSITY, LAMBDA, normalize(False), RESCALE, INT8_MASK),
              needs_base=True, bf16_compute=True, doc="random drop and rescale, then TIES sign election"),
    MethodDef("breadcrumbs", "breadcrumbs", (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False), RESCALE_OFF,
                                                INT8_MASK),
              needs_base=True, bf16_compute=True, doc="drop the largest and the smallest |delta|, then task arithmetic"),
    MethodDef("breadcrumbs_ties", "breadcrumbs_ties",
              (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False), RESCALE_OFF, INT8_MASK), needs_base=True,
              bf16_compute=True,
              doc="breadcrumbs sparsification with TIES sign election"),
    MethodDef("della", "della", (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize(True), RESCALE, INT8_MASK),
              needs_base=True, bf16_compute=True,
              doc="magnitude-ranked random drop (DELLA) and rescale, then TIES sign election"),
    MethodDef("della_linear", "della_linear", (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize(False), RESCALE,
                                               INT8_MASK),
              needs_base=True, bf16_compute=True, doc="magnitude-ranked random drop (DELLA), then task arithmetic"),
    MethodDef("slerp", "slerp", (_p("t", "global", lo=0.0, hi=1.0, doc="0: the base, 1: the other model"),),
              needs_base=True, min_sources=1, max_sources=1, doc="spherical interpolation of two models"),
    MethodDef("model_stock", "model_stock", (_p("filter_wise", "global", False, bool,
                                                 doc="one factor per row instead of per tensor"),),
              needs_base=True, min_sources=2, bf16_compute=True, doc="interpolation by the task vectors' mean cosine"),
    MethodDef("passthrough", "passthrough", (_p("scale", "model", 1.0, doc="multiply the tensor"),),
              needs_base=False, min_sources=1, max_sources=1, explicit_copy=True,
              doc="copy one model (optionally scaled)"),
    # mergekit 0.1.5's newer methods (kernels in rust/src/merge/methods_mk.rs)
    MethodDef("nearswap", "nearswap", (_p("t", "global", doc="distance below which the other model's value is taken"),),
              needs_base=True, min_sources=1, max_sources=1, bf16_compute=True,
              doc="interpolate towards the other model where the two are within t of each other"),
    MethodDef("ram", "ram", (_p("epsilon", "global", 1e-5, doc="|delta| at or below this counts as zero"),),
              needs_base=True, bf16_compute=True,
              doc="unique task-vector entries kept, overlapping ones averaged"),
    MethodDef("ramplus_tl", "ramplus_tl",
              (_p("r", "global", 0.1, doc="rescaling strength of unique entries"),
               _p("alpha", "global", 0.2, doc="upper clamp of the overlap ratio"),
               _p("epsilon", "global", 1e-5, doc="|delta| at or below this counts as zero")),
              needs_base=True, bf16_compute=True,
              doc="ram with unique entries rescaled by the tensor's overlap ratio"),
    MethodDef("sce", "sce", (_p("select_topk", "global", 1.0, lo=0.0, hi=1.0,
                                doc="fraction of elements kept by variance across the models"),
                             INT8_MASK),
              needs_base=True, bf16_compute=True,
              doc="sign election, models weighted by their task vectors' mean square"),
    MethodDef("nuslerp", "nuslerp",
              (WEIGHT,
               _p("nuslerp_row_wise", "global", False, bool,
                  doc="interpolate the vectors along dimension 0 (columns) instead of the rows"),
               _p("nuslerp_flatten", "global", True, bool,
                  doc="interpolate the whole tensor as one vector (overrides nuslerp_row_wise)")),
              needs_base=False, base_optional=True, min_sources=2, max_sources=2, bf16_compute=True,
              doc="spherical interpolation of two models (or of their task vectors when a base is given), "
                  "t = weight2 / (weight1 + weight2)"),
    MethodDef("multislerp", "multislerp",
              (WEIGHT,
               _p("normalize_weights", "global", True, bool, doc="divide the weights by their sum"),
               _p("eps", "global", 1e-8, lo=0.0, doc="added to norms for numerical stability")),
              needs_base=False, base_optional=True, zero_sum_flag="normalize_weights", bf16_compute=True,
              doc="barycentric spherical interpolation of any number of models (or task vectors)"),
    MethodDef("arcee_fusion", "arcee_fusion", (), needs_base=True, min_sources=1, max_sources=1, bf16_compute=True,
              doc="take the other model's value where its importance (|delta| times the row's softmax KL "
                  "divergence) reaches median + 1.5 IQR"),
    MethodDef("karcher", "karcher",
              (_p("max_iter", "global", 10.0, lo=0.0, hi=10_000.0, doc="iterations of the Karcher mean"),
               _p("tol", "global", 1e-5, lo=0.0, doc="convergence tolerance")),
              needs_base=False, bf16_compute=True, doc="Riemannian (Karcher) mean of the models' directions, mean norm"),
)}


def get_method(name: str) -> MethodDef | None:
    return METHODS.get(name)


# ------------------------------------------------------------------------ agreement with the core

def kernel_mismatches(kernels: Sequence[Mapping[str, Any]],
                      methods: Mapping[str, MethodDef] | None = None) -> list[str]:
    """Every disagreement between the method table and the core's kernel table (empty: agree)."""
    methods = METHODS if methods is None else methods
    by_name = {str(k["name"]): k for k in kernels}
    problems: list[str] = []
    used: set[str] = set()
    for m in methods.values():
        k = by_name.get(m.kernel)
        if k is None:
            problems.append(f"method {m.name!r}: kernel {m.kernel!r} is not in the compiled core")
            continue
        used.add(m.kernel)
        want_base = "required" if m.needs_base else "optional" if m.base_optional else "none"
        if k["base"] != want_base:
            problems.append(f"method {m.name!r}: kernel {m.kernel!r} base is {k['base']}, the method's "
                            f"is {want_base}")
        if k["min_sources"] != m.min_sources or k["max_sources"] != m.max_sources:
            problems.append(f"method {m.name!r}: kernel {m.kernel!r} takes {k['min_sources']}.."
                            f"{k['max_sources']} sources, the method {m.min_sources}..{m.max_sources}")
        for scope, key in (("model", "source_params"), ("global", "tensor_params")):
            kp = {str(p["name"]): p for p in k[key]}
            mp = {p.name: p for p in m.kernel_params(scope)}  # type: ignore[arg-type]
            if set(kp) != set(mp):
                problems.append(f"method {m.name!r}: {scope} parameters {sorted(mp)} but kernel "
                                f"{m.kernel!r} reads {sorted(kp)} ({key})")
                continue
            for name, p in mp.items():
                q = kp[name]
                kind = "bool" if p.kind is bool else "number"
                if q["kind"] != kind:
                    problems.append(f"method {m.name!r}: parameter {name!r} is a {kind}, kernel "
                                    f"{m.kernel!r} reads a {q['kind']}")
                    continue
                if kind == "number":
                    lo_ok = q["min"] is None or (p.lo is not None and p.lo >= q["min"])
                    hi_ok = q["max"] is None or (p.hi is not None and p.hi <= q["max"])
                    if not (lo_ok and hi_ok):
                        problems.append(f"method {m.name!r}: parameter {name!r} range {p.range_text} "
                                        f"exceeds kernel {m.kernel!r}'s [{q['min']}, {q['max']}]")
    for name in by_name:
        if name not in used:
            problems.append(f"kernel {name!r} of the compiled core is used by no merge method")
    return problems


def check_kernels(plan_version: int) -> None:
    """Raise if the compiled core and the method table disagree (called at import)."""
    from finrecipe import _core

    problems = kernel_mismatches(_core.kernels())
    if getattr(_core, "PLAN_VERSION", None) != plan_version:
        problems.append(f"the core executes plan version {getattr(_core, 'PLAN_VERSION', None)}, "
                        f"the planner writes {plan_version}")
    if problems:
        raise FinrecipeError("finrecipe._core does not match finrecipe.merge.methods ("
                             + "; ".join(problems) + "); rebuild the extension: make build")
