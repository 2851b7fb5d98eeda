"""docs/extending.md, "Adding an evaluation suite": its code block, run as written."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _suite_code() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Adding an evaluation suite", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has exactly one python example"
    return blocks[0]


@pytest.fixture(scope="module")
def answer_nll(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("plugin")
    (d / "answer_nll_suite.py").write_text(_suite_code(), encoding="utf-8")
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("answer_nll_suite")
    finally:
        sys.path.remove(str(d))
        from finrecipe.eval import suite

        suite.REGISTRY.pop("answer_nll", None)


def test_documented_suite_runs_in_the_evaluate_stage(answer_nll, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import transformers as tf

    from finrecipe.eval.tiny import build_tiny_llama
    from finrecipe.report import eval_notes, eval_tables
    from finrecipe.stages.base import get_kind
    from finrecipe.types import ModelRef, StageContext

    base = build_tiny_llama(tmp_path / "base", vocab_size=300, max_positions=64)
    other = tmp_path / "other"
    m = tf.AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.5)
    m.save_pretrained(str(other))
    tf.AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(other))
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"prompt": "金利とは", "answer": "利息の割合"}, {"prompt": "株式とは", "answer": "会社の持ち分"}]),
        encoding="utf-8")

    kind = get_kind("evaluate")
    cfg = kind.Config.model_validate({"models": ["base", "other"], "reference": "base",
                                      "tasks": [{"answer_nll": "answers.jsonl"}]})
    assert type(cfg.tasks[0]).__name__ == "AnswerNllSpec"
    key_material = kind.cache_config(cfg)
    assert key_material["tasks"] == [{"answer_nll": "answers.jsonl", "name": None, "limit": None}]
    ctx = StageContext(node="eval", workdir=tmp_path, cache_dir=tmp_path / "cache", recipe_dir=tmp_path)
    res = kind.run(cfg, {"base": ModelRef("base", base), "other": ModelRef("other", other)}, tmp_path / "out", ctx)
    met = res.metrics
    assert met["task_order"] == ["nll:answers"]
    r = {name: met["models"][name]["tasks"]["nll:answers"] for name in ("base", "other")}
    assert all(x["metric"] == "answer_nll" and x["n"] == 2 and x["higher_is_better"] is False for x in r.values())
    assert r["base"]["value"] != r["other"]["value"] and all(x["value"] > 0 for x in r.values())

    # the table takes the direction from the results: the lower value is the best, shown as is
    header, rows, marks, _ = eval_tables(met)
    assert header == ["model", "nll:answers"]
    lower = min(r, key=lambda k: r[k]["value"])
    best = {row[0] for row, mk in zip(rows, marks, strict=True) if mk[1]}
    assert best == {lower}
    assert rows[0][1] == f"{r['base']['value']:.3f}"
    assert "answer NLL as is (lower is better)" in eval_notes(met)

    # a file outside the recipe's directories is a request the user must grant
    from finrecipe.node import CheckContext

    cc = CheckContext(node="eval", base_dir=lambda sub: tmp_path, error=lambda m, s: ValueError(m),  # type: ignore[arg-type,return-value]
                      roots=(tmp_path,))
    assert kind.requests(cfg, cc) == []
    far = kind.Config.model_validate({"models": ["base"], "tasks": [{"answer_nll": "/srv/exams/a.jsonl"}]})
    assert [(r.kind, r.what) for r in kind.requests(far, cc)] == [("path", "/srv/exams/a.jsonl")]

    # bumping the suite's version changes the key material of exactly the entries that use it
    answer_nll.AnswerNll.version = "2"
    try:
        assert kind.cache_config(cfg)["tasks"][0]["suite_version"] == "2"
    finally:
        answer_nll.AnswerNll.version = "1"
