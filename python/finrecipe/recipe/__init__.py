"""The recipe engine: read, validate, plan and apply YAML recipes.

    recipe = finrecipe.load_recipe("recipes/merge_tiny.yaml", overrides=["stages.m.t=0.3"])
    recipe.validate(); print(recipe.plan().to_json()); result = recipe.apply()

Importing this package is light (pydantic, yaml); torch is imported only by stages that run.
"""

from finrecipe.recipe.core import Node, Recipe, load_recipe

__all__ = ["ApplyResult", "Node", "Plan", "Recipe", "load_recipe"]


def __getattr__(name: str) -> object:
    if name in ("Plan", "ApplyResult", "PlanNode", "NodeRecord"):
        from finrecipe.recipe import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'finrecipe.recipe' has no attribute {name!r}")
