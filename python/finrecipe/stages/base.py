"""What a stage kind module imports: the node protocol specialised to the `stages:` section.

A stage kind is a `NodeKind` with `section = "stages"` (see `finrecipe.node` for the protocol).
Directory convention for a node with cache key K: ``<workdir>/<node>/<K>/`` is ``out_dir``. A
model-producing stage writes its Hugging Face model directory to ``out_dir / "model"``
(atomically: into a temporary sibling, then renamed), keeps resumable scratch state (training
checkpoints) under ``out_dir / "work"``, and returns ``StageResult(model_dir=out_dir / "model")``.
The engine writes the node's completion marker last; a node without it is not done, and its
``out_dir`` is handed to the next ``run`` as-is so that it can resume.
"""

from __future__ import annotations

from typing import Any, ClassVar

from finrecipe import node as _node
from finrecipe.node import CheckContext, ConfigT, NodeKind, Section, register
from finrecipe.types import DatasetRef, InputKind, InputRef, ModelRef, StageContext, StageResult


class StageKind(NodeKind[ConfigT]):
    """Base of stage kinds: `class MyStage(StageKind[MyConfig])`."""

    section: ClassVar[Section] = "stages"


def get_kind(type_name: str) -> NodeKind[Any]:
    """The stage kind for a stage's `type:` string (imported on first use)."""
    return _node.get_kind("stages", type_name)


__all__ = ["CheckContext", "DatasetRef", "InputKind", "InputRef", "ModelRef", "StageContext", "StageKind",
           "StageResult", "get_kind", "register"]
