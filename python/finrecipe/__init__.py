"""finrecipe: domain instruction-tuned LLMs without instruction data.

Continual pretraining + task-arithmetic model merging + evaluation, driven by declarative recipes.
Heavy modules (torch, transformers) are imported lazily so that `finrecipe --help` and a no-op
`apply` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from finrecipe.recipe import Recipe, load_recipe

__all__ = ["Recipe", "__version__", "load_recipe"]


def __getattr__(name: str) -> Any:
    if name in ("load_recipe", "Recipe"):
        from finrecipe import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'finrecipe' has no attribute {name!r}")
