"""Resolving: every node gets its cache key, in execution order.

Each node's kind computes the key material (`NodeKind.resolve`): sources from content hashes or
pinned hub commits, stages from type, version, config and the keys of their inputs. A node whose
key cannot be known (a hub revision offline, in `plan`) is left unresolved, with everything that
depends on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finrecipe.errors import IoError
from finrecipe.node import Resolution, ResolveContext
from finrecipe.recipe.graph import Node, RecipeGraph
from finrecipe.types import InputRef
from finrecipe.util.content import ShaCache

log = logging.getLogger("finrecipe.recipe")

UNRESOLVED = "unresolved"


@dataclass(frozen=True)
class Resolved:
    """A node's resolution, fixed for the whole command (never mutated)."""

    name: str
    key: str
    material: dict[str, Any]
    out_dir: Path | None = None  # <workdir>/<node>/<key> for nodes that are built
    local_output: InputRef | None = None  # a source that needs no build
    lock_entry: dict[str, Any] | None = None
    size: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    unresolved: str | None = None  # why the key is unknown

    @property
    def local(self) -> bool:
        return self.local_output is not None

    def as_resolution(self) -> Resolution:
        return Resolution(self.key, self.material, self.local_output, self.lock_entry, self.size, self.facts)


def resolve_context(recipe: RecipeGraph, node: Node, done: Mapping[str, Resolved], shas: ShaCache,
                    lock: Mapping[str, Any] | None, refresh: bool) -> ResolveContext:
    return ResolveContext(
        node=node.name, section=node.section, workdir=recipe.workdir, shas=shas, lock=lock, refresh=refresh,
        inputs={d: done[d].as_resolution() for d in node.deps},
        base_dir=lambda sub: recipe.base_dir(node.name, sub),
        error=lambda msg, sub: recipe.error(msg, node.key_path + tuple(sub)),
        recipe_dir=recipe.recipe_dir, node_names=frozenset(recipe.nodes))


def resolve(recipe: RecipeGraph, *, shas: ShaCache, lock: Mapping[str, Any] | None = None,
            refresh: bool = False, allow_unresolved: bool = False) -> dict[str, Resolved]:
    """Cache keys and resolved sources of all nodes, in execution order.

    Hub revisions that are not commit hashes are taken from the lockfile when it pins them for the
    same repo and revision (no network), else resolved on the hub; `refresh` always asks the hub.
    With `allow_unresolved` (for `plan`), a node that reaches the network and cannot be resolved
    leaves itself and everything downstream without a key instead of failing.
    """
    out: dict[str, Resolved] = {}
    for node in recipe:
        bad = next((d for d in node.deps if out[d].unresolved), None)
        if bad is not None:
            out[node.name] = Resolved(node.name, UNRESOLVED, {}, unresolved=f"input {bad!r} is not resolved")
            continue
        rc = resolve_context(recipe, node, out, shas, lock, refresh)
        try:
            r = node.kind.resolve(node.config, rc)
        except IoError as e:
            if not (allow_unresolved and node.kind.network):
                raise
            rev = getattr(node.config, "revision", None)
            out[node.name] = Resolved(node.name, UNRESOLVED, {}, unresolved=(
                f"hub revision {rev or 'main'!r} not resolved (no network?); run `finrecipe lock` "
                "where the hub is reachable, or pin a commit"))
            log.debug("unresolved %s: %s", node.name, e)
            continue
        od = None if r.local_output is not None else recipe.workdir / node.name / r.key
        out[node.name] = Resolved(node.name, r.key, r.material, od, r.local_output, r.lock_entry, r.size,
                                  dict(r.facts))
    return out


def trusts_remote_code(recipe: RecipeGraph, name: str, allowed: frozenset[str] | None = None) -> bool:
    """Whether models of node `name` load with their own code: a source's `trust_remote_code`,
    honoured only for sources the user allowed (`allowed`; None = every source that asks); a
    stage's output inherits it from any of its model inputs (a model trained from a custom-code
    architecture needs the same code to load)."""
    node = recipe.nodes[name]
    own = node.kind.trusts_remote_code(node.config)
    if own is not None:
        return bool(own) and (allowed is None or name in allowed or "*" in allowed)
    return any(trusts_remote_code(recipe, d, allowed) for d in node.deps if recipe.nodes[d].provides == "model")
