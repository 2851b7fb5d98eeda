"""Cache keys of the committed recipes, recorded before the orchestration was restructured.

A workdir built by an earlier finrecipe must still say "nothing to do". When a change alters what
a kind produces, bump that kind's `version` and update these keys in the same commit, saying why.

Changes so far: continual_pretraining version 2 (document-masked packing by default, validation
held out by document): the keys of demo.yaml's base and finance, and of what depends on them
(instruct, merged, eval), changed.

merge_search in the demo: the new dataset finance_dev and stage searched have keys of their own; the
eval stage evaluates `searched` too, so its config (models) and therefore its key changed. No other
key changed.

merge_probe in the demo: the finance stage gained `merge_probe:` (its config and its inputs, instruct
and finance_dev, are part of its key), so finance's key changed, and with it those of merged,
searched and eval (downstream). The kind's version stays 2: a stage without `merge_probe` keeps its
key (merge_tiny.yaml, demo's base, and test_merge_probe.py check it).
"""

from pathlib import Path

import pytest

import finrecipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

KEYS = {
    "demo.yaml": {
        "scratch": "36d88888d3f40e25",
        "general_corpus": "dcd79f0220fe6161",
        "general_instruct": "6768613a3f1628be",
        "finance_corpus": "2fa3e12b33321fd4",
        "finance_heldout": "feef19fc7dc056c7",
        "base": "78616b99792cf2b7",
        "instruct": "c29c93e96d85af1f",
        "finance": "aee2ba0698b07922",
        "merged": "e68c16fa2e06f267",
        "finance_dev": "5a404adb1748708d",
        "searched": "246899a0f0e6400b",
        "eval": "66c273cd704c1752",
    },
    "merge_tiny.yaml": {
        "base": "97d24008029adbe4",
        "instruct": "6db0d19a2b6180f6",
        "domain": "185b697d764bc6c2",
        "domain_instruct": "2740ec9a6b5f5f9d",
        "ties_blend": "7bf355c986916e4f",
        "final": "0689c4c13594b4b1",
    },
}


@pytest.mark.parametrize("name", sorted(KEYS))
def test_recorded_cache_keys(name: str, tmp_path: Path) -> None:
    recipe = finrecipe.load_recipe(RECIPES / name)
    recipe.workdir = tmp_path / "work"  # plan reads the workdir only; keep recipes/ untouched
    keys = {n.name: n.key for n in recipe.plan().nodes}
    assert keys == KEYS[name]
