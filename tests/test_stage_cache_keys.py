"""Stage cache keys: settings that cannot change outputs (logging, checkpoint intervals, eval batch size) stay out."""

from pathlib import Path

import finrecipe

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def _keys(*overrides: str) -> dict[str, str]:
    plan = finrecipe.load_recipe(DEMO, overrides=list(overrides)).plan().to_json()
    return {n["name"]: n["key"] for n in plan["nodes"]}


def test_intervals_do_not_change_keys_but_lr_does() -> None:
    ref = _keys()
    same = _keys("stages.finance.log_every=7", "stages.finance.checkpoint_every_steps=3",
                 "stages.instruct.keep_checkpoints=5")
    assert same == ref
    lr = _keys("stages.finance.optimizer.lr=1.234e-3")
    changed = {n for n in ref if lr[n] != ref[n]}
    # the finance stage and everything downstream of it (the fixed merge, the merge search, the
    # evaluation), nothing else
    assert changed == {"finance", "merged", "searched", "eval"}


def test_eval_batch_size_does_not_change_key() -> None:
    ref = _keys()
    assert _keys("stages.eval.batch_size=3") == ref
