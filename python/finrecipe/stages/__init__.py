"""Stage kinds. Each kind is one module registering a `StageKind` in `REGISTRY` (see base.py)."""

from finrecipe.stages.base import (
    REGISTRY,
    DatasetRef,
    ModelRef,
    StageContext,
    StageKind,
    StageResult,
    get_kind,
    register,
)

__all__ = [
    "REGISTRY",
    "DatasetRef",
    "ModelRef",
    "StageContext",
    "StageKind",
    "StageResult",
    "get_kind",
    "register",
]
