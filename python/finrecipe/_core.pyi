"""Type stubs for the Rust extension `finrecipe._core` (see docs/merge-plan.md)."""

from collections.abc import Callable
from typing import Any

__version__: str

def read_model(path: str) -> dict[str, Any]:
    """Validate and describe a model directory or a single .safetensors file.

    Returns {"files": [name, ...], "tensors": {name: {"dtype": str, "shape": [int],
    "file": str, "data_offsets": [int, int]}}, "metadata": {str: str}} plus "index_metadata"
    for sharded models. Raises FormatError (bad header/index), IoError.
    """

def merge(plan_json: str, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Execute a merge plan with the GIL released.

    progress(done_bytes, total_bytes) is called at most ~10 times per second and once at the end.
    An exception raised by it (KeyboardInterrupt on Ctrl-C) cancels the merge, removes the
    output files and propagates. Returns {"files": [str], "total_bytes": int, "tensors": int,
    "seconds": float}. Raises ConfigError, MismatchError, FormatError, IoError, FinrecipeError.
    """

def analyze(plan_json: str, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Task-vector Gram matrices: {"tensors": {name: {"gram": [[float]], "numel": int}},
    "total": {"gram": [[float]], "numel": int}, "seconds": float}."""

PLAN_VERSION: int

def kernels() -> list[dict[str, Any]]:
    """The kernels this core implements: [{"name": str, "base": "required" | "none",
    "min_sources": int, "max_sources": int | None, "source_params": [param], "tensor_params":
    [param]}] with param = {"name": str, "kind": "number" | "bool", "min": float | None,
    "max": float | None} (every listed parameter is required in a plan)."""

def rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst` only if `dst` does not exist, atomically (Linux renameat2
    RENAME_NOREPLACE). Raises FileExistsError when it exists, IoError for other failures."""

def sort_magnitudes(deltas: list[Any], outs: list[Any], threads: int = 0) -> None:
    """Sort the magnitude keys (f32 bits without the sign) of each float32 buffer `deltas[i]`
    ascending into the uint32 buffer `outs[i]` (same length); tensors in parallel, GIL released.
    Raises ValueError for a buffer of the wrong type, length or layout."""

def merge_into(method: str, out: Any, base: Any, deltas: list[Any], weights: list[float], normalize: bool,
               lambda_: float, out_dtype: str, densities: list[float] | None = None,
               sorted_keys: list[Any | None] | None = None, threads: int = 0) -> None:
    """Merge base + task vectors into the writable float32 buffer `out` (rust/src/inplace.rs):
    method "task_arithmetic" or "ties" (densities and, where a density is < 1, the
    sort_magnitudes keys of that task vector), out_dtype "F32" | "BF16" | "F16" (values rounded
    to it). Bit-identical to `merge` with the same plan entry. GIL released."""

def load_task_vectors(base_dir: str, model_dirs: list[str], names: list[str], base_out: list[Any],
                      delta_out: list[list[Any]], keys_out: list[list[Any | None]] | None = None,
                      threads: int = 0) -> None:
    """Read θ_base into base_out[i] and δ = θ_m − θ_base into delta_out[m][i] (writable float32
    buffers) for each tensor names[i] of each model directory model_dirs[m], as the merge loads
    them; where keys_out[m][i] is given, sort δ's magnitude keys into it (as sort_magnitudes).
    Tensors in parallel on `threads` threads, GIL released. Raises MismatchError (a missing or
    non-float tensor, a wrong size), FormatError, IoError, ValueError (bad buffers)."""
