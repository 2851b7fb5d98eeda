"""Model merging: mergekit-compatible configs, planning against headers, and the merge run.

The public API: `load_merge_config`, `MergeConfig`, `validate_merge`, `run_merge`, `MergePlanInfo`,
`MergeResult`, `read_model`. The heavy lifting is done by the Rust core (`finrecipe._core.merge`);
`finrecipe.merge.pyexec` is a slow plain-torch executor of the same plan (tests, fallback).

Where finrecipe deliberately differs from mergekit:
- validation is strict and happens before any tensor data is read (unknown keys and parameters,
  parameters set at the wrong level, missing tensors, shape and vocabulary mismatches);
- arithmetic is always float32 (with `dtype: bfloat16` mergekit computes in bf16); outputs are
  rounded once, round-to-nearest-even;
- DARE masks come from a generator keyed by (seed, tensor name, element), not torch's global RNG;
- TIES/breadcrumbs choose deterministically among entries whose |delta| ties at the top-k threshold
  (mergekit's `argsort` is unstable there);
- `tokenizer_source: union` and other vocabulary-changing options are refused, not approximated.
"""

from finrecipe.merge.config import METHODS, MergeConfig, load_merge_config
from finrecipe.merge.headers import ModelInfo, TensorInfo, read_model
from finrecipe.merge.plan import MergePlanInfo, build_plan
from finrecipe.merge.run import MergeResult, run_merge, validate_merge

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergePlanInfo",
    "MergeResult",
    "ModelInfo",
    "TensorInfo",
    "build_plan",
    "load_merge_config",
    "read_model",
    "run_merge",
    "validate_merge",
]
