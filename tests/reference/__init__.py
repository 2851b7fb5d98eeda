"""Independent reference implementations used by the tests (never by the package).

- `headers.py`: a pure-Python safetensors header and shard-index reader with the same checks as
  the Rust core's `read_model`;
- `pyexec.py`: a plain-torch float32 executor of merge plans (docs/merge-plan.md);
- `analysis.py`: the task-vector Gram matrices with torch (f64).

They are slow and hold whole tensors in memory; their value is that they share no code with the
Rust core, so agreement between the two is evidence that both are right.
"""
