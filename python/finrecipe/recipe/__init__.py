"""The recipe engine: read, validate, plan and apply YAML recipes.

    recipe = finrecipe.load_recipe("recipes/merge_tiny.yaml", overrides=["stages.m.t=0.3"])
    recipe.validate(); print(recipe.plan().to_json()); result = recipe.apply()

Modules, each pointing only down: loader (YAML, extends, --set) → schema → graph (nodes, references,
order; plain data) → resolve (cache keys) → lockfile → status (a node's status, decided once) →
records (plan, apply result, run.json) → execute (apply) → api (the public entry points).
Importing this package is light (pydantic, yaml); torch is imported only by kinds that run.
"""

from finrecipe.recipe.api import Recipe, load_recipe
from finrecipe.recipe.graph import Node
from finrecipe.recipe.records import ApplyResult, NodeRecord, Plan, PlanNode

__all__ = ["ApplyResult", "Node", "NodeRecord", "Plan", "PlanNode", "Recipe", "load_recipe"]
