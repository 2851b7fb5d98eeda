"""Model merging: mergekit-compatible configs, planning against headers, and the merge run.

The public API: `load_merge_config`, `MergeConfig`, `validate_merge`, `run_merge`, `MergePlanInfo`,
`MergeResult`, `read_model` (the validated safetensors reader every command uses), and `METHODS`
(the merge-method table of `finrecipe.merge.methods`). The heavy lifting is done by the Rust core
(`finrecipe._core.merge`); importing this package checks that the core's kernels and the method
table agree.

Where finrecipe deliberately differs from mergekit:
- validation is strict and happens before any tensor data is read (unknown keys and parameters,
  parameters set at the wrong level, missing tensors, shape and vocabulary mismatches);
- `dtype: bfloat16` computes in bf16 in mergekit's order of operations, as mergekit does
  (`compute_dtype: float32` computes exactly in float32 instead); float32 results are rounded to the
  output dtype once, round-to-nearest-even;
- DARE masks come from a generator keyed by (seed, tensor name, element), not torch's global RNG;
- TIES/breadcrumbs choose deterministically among entries whose |delta| ties at the top-k threshold
  (mergekit's `argsort` is unstable there);
- Mixtral experts are merged per expert tensor of the checkpoint (whole-tensor statistics such as
  top-k ranks are per expert); mergekit 0.1.5 takes them over transformers 5's fused expert tensor;
- a union vocabulary's appended tokens are ordered by model and id, not by hash-map order (mergekit's
  ids for them change from run to run); the rows are mergekit's (merge/tokenizer.py).
"""

from finrecipe.merge.config import MergeConfig, load_merge_config
from finrecipe.merge.headers import ModelInfo, TensorInfo, read_model
from finrecipe.merge.methods import METHODS, MethodDef, ParamDef, check_kernels
from finrecipe.merge.plan import PLAN_VERSION, MergePlanInfo, build_plan
from finrecipe.merge.run import MergeResult, run_merge, validate_merge

check_kernels(PLAN_VERSION)

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergePlanInfo",
    "MergeResult",
    "MethodDef",
    "ModelInfo",
    "ParamDef",
    "TensorInfo",
    "build_plan",
    "load_merge_config",
    "read_model",
    "run_merge",
    "validate_merge",
]
