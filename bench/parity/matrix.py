"""The generated matrix of merge configs the parity harness runs through mergekit and finrecipe.

Each case is a mergekit YAML config (as a dict, model names as `@family/variant` placeholders),
a verdict rule and a size tag. Every case runs once per compute dtype: `dtype: float32` with
`out_dtype: bfloat16` (the bench's setting) and `dtype: bfloat16` (what most published configs say);
randomised cases use `dtype: float32` without out_dtype, so their float32 output shows each kept
element's rescaling exactly.

Verdict rules (see check.py):
  exact   deterministic: every element within 1 bf16 ulp of mergekit's
  topk    like exact, except elements where a magnitude equals a selection threshold (ties broken
          in a different order); every such element is proven to be one
  random  the keep-mask is drawn differently by design: the kept fraction is within binomial
          bounds and every element is reproduced by some keep-mask with the exact L1 rescaling
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import tokenizer_cases

DTYPES = ("f32", "bf16")


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    rule: str  # exact | topk | random
    config: dict[str, Any]
    ci: bool = False  # part of the CI-sized subset run by `make test`
    # mergekit writes float32 although the config says bfloat16 (a torch type promotion in its
    # kernel): its output is rounded to bf16 before comparing (a documented mergekit bug)
    mk_f32_promotion: bool = False
    note: str = ""
    dtypes: tuple[str, ...] = DTYPES
    tags: tuple[str, ...] = field(default_factory=tuple)
    # environment of mergekit's process on top of run.py's MERGEKIT_ENV (e.g. ATen's scalar kernels)
    mk_env: dict[str, str] = field(default_factory=dict)


def m(variant: str, **params: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"model": f"@{variant}"}
    if params:
        d["parameters"] = params
    return d


def cfg(method: str, models: list[dict[str, Any]] | None = None, base: str | None = "base",
        parameters: dict[str, Any] | None = None, slices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"merge_method": method}
    if base:
        c["base_model"] = f"@{base}"
    if parameters:
        c["parameters"] = parameters
    if models is not None:
        c["models"] = models
    if slices is not None:
        c["slices"] = slices
    return c


# mergekit's whole-tensor reductions under dtype: bfloat16 (norms, dot products, sums to one value) run in
# torch's two-pass parallel reduction above 32768 elements: one partial sum per torch thread, each rounded
# to bf16, so the result depends on mergekit's thread count. finrecipe sums in order and rounds once, as
# mergekit does with one thread (run.py's ORACLE_ENV runs the oracle so).
BF16_WHOLE_SUMS = ("bf16 row: mergekit's whole-tensor bf16 sums are per-thread partial sums rounded to bf16, so "
                   "its output depends on its thread count; finrecipe's equals its one-thread output")

# arcee_fusion: f32 rows differ where mergekit's float32 KL (a small difference of large terms) flips a decision
# that the exactly summed KL does not (check.py's explain_arcee_fusion proves each); bf16 rows replay torch's
# scalar bf16 softmax, row sums and signed quantiles, and match exactly (mergekit run with ATen's scalar kernels).
ARCEE_NOTE = ("f32: finrecipe sums the KL exactly (mergekit's float32 sum is off by up to ~10% for close "
              "models; every flipped decision proven); bf16: torch's scalar bf16 arithmetic replayed (mergekit run with "
              "ATen's scalar kernels: its vectorised softmax's exp depends on the vector width). mergekit "
              "writes float32 (its float mask promotes the result), compared after rounding")

# torch's scalar CPU kernels for mergekit's process: its vectorised softmax uses a fast exp whose last bits
# depend on the vector width (AVX2 and AVX512 differ), so arcee_fusion's bf16 output is machine-dependent;
# finrecipe replays the scalar kernel (libm expf), the reference every machine can reproduce
SCALAR_KERNELS = {"ATEN_CPU_CAPABILITY": "default"}

ATTN_MLP_RULES = [{"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": 0.2}, {"value": 0.5}]

CASES: list[Case] = [
    # ---- linear --------------------------------------------------------------------------------------------
    Case("linear", "llama", "exact", cfg("linear", [m("instruct", weight=1.0), m("cpt", weight=1.0)], base=None),
         ci=True),
    Case("linear-nonorm-0.3/0.7", "llama", "exact",
         cfg("linear", [m("instruct", weight=0.3), m("cpt", weight=0.7)], base=None,
             parameters={"normalize": False}), ci=True, note="issue 10"),
    Case("linear-uneven-norm", "qwen2", "exact",
         cfg("linear", [m("instruct", weight=0.3), m("cpt", weight=0.9)], base=None)),
    Case("linear-3-models", "mixtral", "exact",
         cfg("linear", [m("base", weight=0.2), m("instruct", weight=0.3), m("cpt", weight=0.5)], base=None)),
    Case("linear-gradient", "llama", "exact",
         cfg("linear", [m("instruct", weight=[0.0, 0.5, 1.0]), m("cpt", weight=[1.0, 0.25, 0.0])], base=None)),
    Case("linear-filter", "llama", "exact",
         cfg("linear", [m("instruct", weight=ATTN_MLP_RULES), m("cpt", weight=0.5)], base=None)),
    # ---- task arithmetic -----------------------------------------------------------------------------------
    Case("task_arithmetic", "llama", "exact",
         cfg("task_arithmetic", [m("instruct", weight=1.0), m("cpt", weight=1.0)]), ci=True),
    Case("task_arithmetic-lambda", "qwen2", "exact",
         cfg("task_arithmetic", [m("instruct", weight=0.5), m("cpt", weight=0.8)], parameters={"lambda": 0.7})),
    Case("task_arithmetic-normalize", "mixtral", "exact",
         cfg("task_arithmetic", [m("instruct", weight=0.4), m("cpt", weight=0.9)], parameters={"normalize": True})),
    Case("task_arithmetic-base-listed", "llama", "exact",
         cfg("task_arithmetic", [m("base"), m("instruct", weight=0.6), m("cpt", weight=0.6)])),
    Case("task_arithmetic-gradient-filter", "llama", "exact",
         cfg("task_arithmetic", [m("instruct", weight=[0.2, 1.0]),
                                 m("cpt", weight=[{"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}])])),
    Case("task_arithmetic-slices", "llama", "exact",
         cfg("task_arithmetic", slices=[
             {"sources": [{"model": "@base", "layer_range": [0, 2]},
                          {"model": "@instruct", "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                          {"model": "@cpt", "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
             {"sources": [{"model": "@base", "layer_range": [2, 4]},
                          {"model": "@instruct", "layer_range": [2, 4], "parameters": {"weight": 0.3}},
                          {"model": "@cpt", "layer_range": [2, 4], "parameters": {"weight": [0.0, 1.0]}}]}])),
    # ---- TIES ----------------------------------------------------------------------------------------------
    Case("ties", "llama", "topk",
         cfg("ties", [m("instruct", weight=1.0, density=0.5), m("cpt", weight=1.0, density=0.5)]), ci=True),
    Case("ties-uneven", "qwen2", "topk",
         cfg("ties", [m("instruct", weight=0.6, density=0.3), m("cpt", weight=0.4, density=0.8)]), ci=True),
    Case("ties-nonorm-lambda-moe", "mixtral", "topk",
         cfg("ties", [m("instruct", weight=0.7, density=0.4), m("cpt", weight=0.5, density=0.6)],
             parameters={"normalize": False, "lambda": 1.5}), ci=True,
         note="MoE layout (by design): mergekit selects the top-k over transformers 5's fused expert tensor "
              "(all experts' gate and up projections), finrecipe over each expert tensor of the checkpoint; every "
              "differing element is proven to be each tool's own selection (ties included)"),
    Case("ties-base-listed-int8", "llama", "topk",
         cfg("ties", [m("base"), m("instruct", weight=1.0, density=0.6), m("cpt", weight=1.0, density=0.6)],
             parameters={"int8_mask": True})),
    Case("ties-gradient-filter", "llama", "topk",
         cfg("ties", [m("instruct", weight=1.0, density=[0.2, 0.9]),
                      m("cpt", weight=1.0, density=[{"filter": "self_attn", "value": 0.3}, {"value": 0.7}])])),
    Case("ties-3-donors", "qwen2", "topk",
         cfg("ties", [m("instruct", weight=0.5, density=0.5), m("cpt", weight=0.3, density=0.5),
                      m("far", weight=0.2, density=0.2)])),
    # ---- breadcrumbs ---------------------------------------------------------------------------------------
    Case("breadcrumbs", "llama", "topk",
         cfg("breadcrumbs", [m("instruct", weight=1.0, density=0.7, gamma=0.05),
                             m("cpt", weight=1.0, density=0.6, gamma=0.02)])),
    Case("breadcrumbs-default-gamma", "qwen2", "topk",
         cfg("breadcrumbs", [m("instruct", weight=0.6, density=0.5), m("cpt", weight=0.6, density=0.9)])),
    Case("breadcrumbs-rescale", "llama", "topk",
         cfg("breadcrumbs", [m("instruct", weight=1.0, density=0.5, gamma=0.1), m("cpt", weight=1.0, density=0.5)],
             parameters={"rescale": True}),
         note=BF16_WHOLE_SUMS),
    Case("breadcrumbs_ties", "llama", "topk",
         cfg("breadcrumbs_ties", [m("instruct", weight=1.0, density=0.7, gamma=0.05),
                                  m("cpt", weight=1.0, density=0.6, gamma=0.02)]), ci=True, note="issue 10"),
    Case("breadcrumbs_ties-normalize", "qwen2", "topk",
         cfg("breadcrumbs_ties", [m("instruct", weight=0.5, density=0.6, gamma=0.01),
                                  m("cpt", weight=0.8, density=0.6, gamma=0.05)], parameters={"normalize": True})),
    # ---- DARE / DELLA (random masks) -----------------------------------------------------------------------
    Case("dare_linear-1", "llama", "random",
         cfg("dare_linear", [m("instruct", weight=0.8, density=0.6)]), ci=True),
    Case("dare_linear-2", "qwen2", "random",
         cfg("dare_linear", [m("instruct", weight=1.0, density=0.5), m("cpt", weight=0.5, density=0.7)])),
    Case("dare_linear-norescale", "mixtral", "random",
         cfg("dare_linear", [m("instruct", weight=1.0, density=0.4)], parameters={"rescale": False})),
    Case("dare_ties-1", "llama", "random",
         cfg("dare_ties", [m("instruct", weight=1.0, density=0.3)], parameters={"lambda": 0.9})),
    Case("dare_ties-2", "llama", "random",
         cfg("dare_ties", [m("instruct", weight=1.0, density=0.5), m("cpt", weight=1.0, density=0.5)])),
    Case("della-1", "llama", "random",
         cfg("della", [m("instruct", weight=1.0, density=0.5, epsilon=0.2)]),
         note=BF16_WHOLE_SUMS),
    Case("della-2", "llama", "random",
         cfg("della", [m("instruct", weight=1.0, density=0.6), m("cpt", weight=0.7, density=0.4, epsilon=0.1)])),
    Case("della_linear-1", "llama", "random",
         cfg("della_linear", [m("cpt", weight=0.9, density=0.7, epsilon=0.1)])),
    # ---- SLERP family --------------------------------------------------------------------------------------
    Case("slerp", "llama", "exact", cfg("slerp", [m("base"), m("far")], parameters={"t": 0.3}), ci=True),
    Case("slerp-gradient-filter", "llama", "exact",
         cfg("slerp", [m("base"), m("far")], parameters={"t": [
             {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
             {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]})),
    Case("slerp-tied", "qwen2", "exact", cfg("slerp", [m("base"), m("instruct")], parameters={"t": 0.6})),
    Case("nuslerp-base", "llama", "exact", cfg("nuslerp", [m("instruct", weight=0.4), m("far", weight=0.6)])),
    Case("nuslerp-rowwise-nobase", "qwen2", "exact",
         cfg("nuslerp", [m("instruct", weight=1.0), m("far", weight=2.0)], base=None,
             parameters={"nuslerp_row_wise": True, "nuslerp_flatten": False}), ci=True),
    Case("nuslerp-rowwise-base", "llama", "exact",
         cfg("nuslerp", [m("instruct", weight=0.7), m("cpt", weight=0.2)],
             parameters={"nuslerp_row_wise": True, "nuslerp_flatten": False})),
    Case("nuslerp-zero-weights", "qwen2", "exact",
         cfg("nuslerp", [m("instruct", weight=1.0), m("far", weight=-1.0)], base=None)),
    Case("nuslerp-rows-nobase", "mixtral", "exact",
         cfg("nuslerp", [m("cpt", weight=1.0), m("far", weight=1.0)], base=None,
             parameters={"nuslerp_flatten": False})),
    Case("multislerp-base", "llama", "exact",
         cfg("multislerp", [m("instruct", weight=1.0), m("cpt", weight=1.0), m("far", weight=0.5)])),
    Case("multislerp-nobase", "qwen2", "exact",
         cfg("multislerp", [m("instruct", weight=0.3), m("far", weight=0.7)], base=None,
             parameters={"normalize_weights": False})),
    Case("multislerp-eps", "llama", "exact",
         cfg("multislerp", [m("instruct", weight=0.5), m("cpt", weight=0.2), m("far", weight=0.3)],
             parameters={"eps": 1e-4})),
    Case("multislerp-one", "qwen2", "exact", cfg("multislerp", [m("far", weight=0.4)])),
    Case("karcher", "llama", "exact", cfg("karcher", [m("instruct"), m("cpt"), m("far")], base=None), ci=True,
         note="bf16 row: finrecipe replays mergekit's bf16 iteration op by op (its bf16 iteration does not "
              "converge on these models, so the output is wherever step 10 lands and hinges on last bits): "
              "torch's f32 vector_norm sums squares in 8 f32 lanes (not the exact norm), and the 0-dim f32 "
              "cos(tn), sin(tn) and scale are rounded to bf16 before they multiply; mergekit's own output is "
              "the same with 1, 2 or 4 torch threads and ATen CPU capability default, AVX2 or AVX512"),
    # ---- others --------------------------------------------------------------------------------------------
    Case("model_stock", "llama", "exact", cfg("model_stock", [m("instruct"), m("cpt"), m("far")]),
         note=BF16_WHOLE_SUMS + " (its mean cos of embed_tokens: -0.000576 with 1 thread, -0.000572 "
              "with 2)"),
    Case("model_stock-filter_wise", "mixtral", "exact",
         cfg("model_stock", [m("instruct"), m("cpt")], parameters={"filter_wise": True})),
    Case("passthrough-slices", "llama", "exact", cfg("passthrough", base=None, slices=[
        {"sources": [{"model": "@instruct", "layer_range": [0, 3]}]},
        {"sources": [{"model": "@cpt", "layer_range": [1, 4]}]}])),
    Case("passthrough-scale", "qwen2", "exact",
         cfg("passthrough", [m("instruct", scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])],
             base=None)),
    Case("sce", "llama", "topk", cfg("sce", [m("instruct"), m("cpt"), m("far")], parameters={"select_topk": 0.5})),
    Case("sce-all", "qwen2", "exact", cfg("sce", [m("instruct"), m("cpt")])),
    Case("sce-topk-0.2", "qwen2", "topk", cfg("sce", [m("instruct"), m("cpt")], parameters={"select_topk": 0.2}),
         ci=True),
    Case("nearswap", "llama", "exact", cfg("nearswap", [m("far")], parameters={"t": 0.001})),
    Case("arcee_fusion", "llama", "topk", cfg("arcee_fusion", [m("far")]), mk_f32_promotion=True,
         note=ARCEE_NOTE, mk_env=SCALAR_KERNELS),
    Case("arcee_fusion-tied", "qwen2", "topk", cfg("arcee_fusion", [m("instruct")]), mk_f32_promotion=True,
         note=ARCEE_NOTE, mk_env=SCALAR_KERNELS),
    Case("ram", "llama", "exact", cfg("ram", [m("instruct"), m("cpt")], parameters={"epsilon": 1e-3})),
    Case("ramplus_tl", "qwen2", "exact", cfg("ramplus_tl", [m("instruct"), m("cpt")],
                                              parameters={"epsilon": 1e-3, "r": 0.2, "alpha": 0.5}),
         mk_f32_promotion=True, note="bf16: mergekit writes float32 (type promotion bug), compared after rounding"),
]

CASES += tokenizer_cases.cases(Case)  # tokenizer_source, tokenizer:, chat templates (tokenizer_cases.py)


def instantiate(case: Case, dtype: str, models: dict[str, str]) -> dict[str, Any]:
    """The concrete config for one dtype, `@variant` placeholders replaced by model directories."""
    c = copy.deepcopy(case.config)

    def sub(x: Any) -> Any:
        if isinstance(x, str) and x.startswith("@"):
            return models[x[1:]]
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    c = sub(c)
    if case.rule == "random":
        c["dtype"] = "float32" if dtype == "f32" else "bfloat16"
    elif dtype == "f32":
        c["dtype"], c["out_dtype"] = "float32", "bfloat16"
    else:
        c["dtype"] = "bfloat16"
    return c
