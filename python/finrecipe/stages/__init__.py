"""Stage kinds. Each kind is one module registering a `StageKind` in `REGISTRY` (see base.py)."""

from finrecipe.stages.base import (
    DatasetRef,
    ModelRef,
    StageContext,
    StageKind,
    StageResult,
    get_kind,
    register,
)

__all__ = [
    "DatasetRef",
    "ModelRef",
    "StageContext",
    "StageKind",
    "StageResult",
    "get_kind",
    "register",
]
