"""The offline demo: bundled data is what the generator makes, the tokenizer covers it, and the demo
recipe runs end to end (with reduced sizes through --set) and is reused by a second apply."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from finrecipe.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DATA = RECIPES / "data"

# The demo at toy size: every stage runs, in seconds. (The effect itself needs the full sizes.)
SMALL = {
    "models.scratch.init.config.hidden_size": 32,
    "models.scratch.init.config.intermediate_size": 64,
    "models.scratch.init.config.num_hidden_layers": 1,
    "models.scratch.init.config.num_attention_heads": 2,
    "models.scratch.init.config.num_key_value_heads": 2,
    "stages.base.epochs": 0.2,
    "stages.instruct.epochs": 0.5,
    "stages.finance.epochs": 0.2,
    "stages.eval.tasks.0.limit": 6,
    "stages.eval.tasks.0.max_new_tokens": 3,
    "stages.eval.tasks.1.limit": 6,
    "stages.eval.tasks.1.max_new_tokens": 3,
    "stages.eval.tasks.2.limit": 6,
    "stages.eval.tasks.3.limit": 6,
    "stages.searched.trials": 3,
    "stages.searched.objective.instruction.limit": 6,
}


def _read(rel: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in (DATA / rel).read_text(encoding="utf-8").splitlines()]


def test_bundled_data_is_what_the_generator_makes() -> None:
    r = subprocess.run([sys.executable, str(DATA / "generate.py"), "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_bundled_data_is_small() -> None:
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 3_000_000


def test_finance_entities_never_appear_in_general_data() -> None:
    niche = {str(r["entity"]) for r in _read("finance/eval_questions.jsonl")}
    assert len(niche) >= 20
    general = " ".join(json.dumps(r) for f in ("general/corpus.jsonl", "general/instruct.jsonl",
                                               "general/eval_instruct.jsonl") for r in _read(f))
    words = set(general.replace('"', " ").split())
    assert not niche & words
    fin_corpus = " ".join(str(r["text"]) for r in _read("finance/corpus.jsonl"))
    assert all(n in fin_corpus for n in niche)
    # prose only: no instruction markers in the finance corpus
    assert "<|user|>" not in fin_corpus and "?" not in fin_corpus


def test_general_heldout_questions_are_not_trained() -> None:
    trained = {str(r["prompt"]) for r in _read("general/instruct.jsonl")}
    held = _read("general/eval_instruct.jsonl")
    assert held and not any(r["prompt"] in trained for r in held)


def test_tokenizer_covers_data_and_chat_format() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>"
    texts = [str(r["text"]) for r in _read("general/corpus.jsonl")[:200] + _read("finance/corpus.jsonl")[:200]]
    texts += [str(r["prompt"]) + " " + str(r["answer"]) for r in _read("finance/eval_questions.jsonl")]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids) == t
    chat = tok.apply_chat_template([{"role": "user", "content": "where is Kaldex headquartered ?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|> where is Kaldex headquartered ? <|assistant|>"
    # the finetune template of the demo renders to the same tokens as the chat template
    demo = (RECIPES / "demo.yaml").read_text()
    assert 'template: "<|user|> {prompt} <|assistant|>"' in demo


@pytest.mark.slow
def test_demo_runs_end_to_end_with_reduced_sizes(tmp_path: Path) -> None:
    # the lockfile goes to tmp_path: the test never rewrites recipes/demo.yaml.lock
    lock = tmp_path / "demo.lock"
    args = ["apply", str(RECIPES / "demo.yaml"), "-q", "--set", f"workdir={tmp_path / 'run'}",
            "--lock-file", str(lock)]
    committed_lock = (RECIPES / "demo.yaml.lock").read_bytes()
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    state = tmp_path / "run"
    report = json.loads((state / "report.json").read_text())
    nodes = report["nodes"] if isinstance(report.get("nodes"), list) else list(report["nodes"].values())
    names = {n["name"] for n in nodes}
    assert {"scratch", "base", "instruct", "finance", "merged", "searched", "eval"} <= names
    assert all(n["status"] in ("ran", "cached", "local") for n in nodes), nodes
    assert (state / "report.md").is_file()
    assert any(state.glob("report*.html")) or any(state.rglob("*.html"))
    # the evaluation covered all five models (the searched merge beside the fixed one) and every task,
    # plus the task-vector analysis
    ev = next(n for n in nodes if n["name"] == "eval")
    metrics = ev.get("metrics") or json.loads(
        next(state.glob("eval/*/result.json")).read_text())["metrics"]
    assert set(metrics["models"]) == {"base", "instruct", "finance", "merged", "searched"}
    for m in metrics["models"].values():
        assert {"custom:finance_qa", "custom:general_qa", "custom:finance_mc", "ppl:finance_heldout"} <= set(
            m["tasks"])
    assert metrics["analysis"] is not None
    # it ends with the results table (all five models) and the path of the HTML report
    out = res.output[res.output.index("results: eval"):]
    assert all(f"│ {m} " in out for m in ("base", "instruct", "finance", "merged", "searched"))
    assert out.rstrip().splitlines()[-1] == f"report: {state / 'report.html'}"
    # a second apply reuses everything, and shows the same table
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == 0, res2.output
    assert "nothing to do" in res2.output
    assert res2.output[res2.output.index("results: eval"):] == out
    # the sources resolve as the committed lockfile says, which the test left untouched
    assert yaml.safe_load(lock.read_text()) == yaml.safe_load(committed_lock)
    assert (RECIPES / "demo.yaml.lock").read_bytes() == committed_lock
