"""Model merging: mergekit-compatible configs, planning against headers, and the merge run.

The public API: `load_merge_config`, `MergeConfig`, `validate_merge`, `run_merge`, `MergePlanInfo`,
`MergeResult`, `read_model`. The heavy lifting is done by the Rust core (`finrecipe._core.merge`).
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
