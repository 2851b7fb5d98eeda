"""The suite registry, typed results, the shared loop (with a model-free LM) and HFLM's requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from finrecipe.errors import ConfigError
from finrecipe.eval.requests import GenerationRequest, Request, RollingRequest
from finrecipe.eval.results import EvalMetrics, ModelScores, TaskResult
from finrecipe.eval.suite import BUILTIN, get_suite, suite_for_entry


def test_builtin_suites_are_registered_and_selected_by_their_keys() -> None:
    for name in BUILTIN:
        assert get_suite(name).name == name
    cases = {"jfin": {"suite": "jfin", "data_dir": "x"}, "custom": {"custom": "a.jsonl"},
             "perplexity": {"files": ["a.txt"]}, "generate": {"generate": "p.txt"}}
    for name, entry in cases.items():
        s = suite_for_entry(entry)
        assert s is not None and s.name == name
    assert suite_for_entry({"perplexity": "heldout"}) is get_suite("perplexity")
    assert suite_for_entry({"kind": "generation"}) is None
    with pytest.raises(ConfigError, match=r"unknown evaluation suite 'nope'; known: custom, generate, jfin"):
        get_suite("nope")


def test_stage_config_errors_name_the_entry() -> None:
    from finrecipe.stages.base import get_kind

    kind = get_kind("evaluate")
    with pytest.raises(ValidationError, match=r"tasks\[0\]: unknown evaluation suite 'jfn'"):
        kind.Config.model_validate({"models": ["a"], "tasks": [{"suite": "jfn"}]})
    with pytest.raises(ValidationError, match=r"tasks\[1\]: say what to run with one of `suite: jfin`"):
        kind.Config.model_validate({"models": ["a"], "tasks": [{"custom": "x"}, {"template": "t"}]})
    # no default pointing into a development workspace: the data directory is said explicitly
    with pytest.raises(ValidationError, match=r"data_dir: missing; set `data_dir:` to the japanese-lm-fin-harness "
                                              r"data: a checkout of https://github.com/pfnet-research"):
        kind.Config.model_validate({"models": ["a"], "tasks": [{"suite": "jfin"}]})


def test_results_round_trip_through_json() -> None:
    r = TaskResult(task="fp2", metric="acc", value=0.25, stderr=0.1, n=4, version="0.2",
                   metrics={"acc": 0.25, "acc_norm": 0.5})
    low = TaskResult(task="ppl:h", metric="bits_per_byte", value=1.5, n=3, higher_is_better=False)
    gone = TaskResult.absent("chabsa", "no data")
    assert gone.to_json() == {"missing": "no data"} and not gone.scored
    assert list(r.to_json()) == ["metric", "value", "stderr", "n", "version", "higher_is_better", "metrics"]
    em = EvalMetrics(models={"a": ModelScores(tasks={"fp2": r, "ppl:h": low, "chabsa": gone}, average=25.0,
                                              best_version="0.2"),
                             "b": ModelScores(tasks={"fp2": r, "ppl:h": low, "chabsa": gone})},
                     task_order=["chabsa", "fp2", "ppl:h"], reference="a")
    em.deltas = EvalMetrics.compute_deltas(em.models, "a")
    d = json.loads(json.dumps(em.to_json()))
    assert d["schema"] == "finrecipe.evaluate/1" and d["deltas"]["b"] == {"fp2": 0.0, "ppl:h": 0.0}
    back = EvalMetrics.from_json(d)
    assert back.to_json() == d
    assert back.models["a"].tasks["ppl:h"].higher_is_better is False
    assert back.models["a"].tasks["chabsa"].missing == "no data"


class FakeLM:
    """A model-free LM: log-likelihood = −(length of the continuation); generation echoes."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    def loglikelihood(self, requests: Sequence[Request], **_: object) -> list[tuple[float, bool]]:
        self.seen += list(requests)
        return [(-float(len(r.continuation)), False) for r in requests]

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest], **_: object) -> list[float]:
        return [-float(len(r.text)) for r in requests]

    def generate_until(self, requests: Sequence[GenerationRequest], **_: object) -> list[str]:
        return [r.context.split("?")[0] for r in requests]

    def tok_encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_one_loop_runs_every_suite_on_each_model(tmp_path: Path) -> None:
    from finrecipe.eval.loop import evaluate_models
    from finrecipe.stages.base import get_kind
    from finrecipe.types import DatasetRef, ModelRef

    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"question": "q1", "choices": ["long one", "s"], "answer": 1},     # shortest choice wins: right
        {"question": "q2", "choices": ["xx", "y", "zzz"], "answer": 0}]))  # picks "y": wrong
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "abc?", "answer": "ABC"}))
    (tmp_path / "held.jsonl").write_text(json.dumps({"text": "héllo"}))
    cfg = get_kind("evaluate").Config.model_validate({"models": ["m1", "m2"], "reference": "m1", "tasks": [
        {"custom": "mc.jsonl"}, {"custom": "qa.jsonl", "kind": "generation"}, {"perplexity": "held"}]})
    lms: list[FakeLM] = []

    def load(ref: ModelRef) -> FakeLM:
        lms.append(FakeLM())
        return lms[-1]

    run = evaluate_models([ModelRef("m1", tmp_path), ModelRef("m2", tmp_path)], cfg.tasks, out_dir=tmp_path / "o",
                          recipe_dir=tmp_path, inputs={"held": DatasetRef("held", (tmp_path / "held.jsonl",), "jsonl")},
                          load=load)
    assert len(lms) == 2 and run.task_order == ["custom:mc", "custom:qa", "ppl:held"]
    assert lms[0].seen[0] == Request("q1\nA. long one\nB. s\n答え:", " long one")
    met = run.metrics("m1")
    t = met.models["m2"].tasks
    assert t["custom:mc"].value == 0.5 and t["custom:mc"].n == 2
    assert t["custom:qa"].value == 1.0 and t["custom:qa"].metric == "exact_match"  # "abc" == "ABC" normalised
    import math

    assert t["ppl:held"].value == pytest.approx(5 / (math.log(2) * len("héllo".encode())))
    assert t["ppl:held"].metrics is not None and t["ppl:held"].metrics["tokens"] == 5
    assert met.deltas["m2"]["custom:mc"] == 0.0
    assert run.artifacts["generations_m2_custom:qa"].endswith("generations/m2.custom-qa.jsonl")


def test_hflm_is_greedy_is_the_argmax_of_every_continuation_token(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.scoring import encode_pair
    from finrecipe.eval.tiny import build_tiny_llama

    lm = HFLM.load(build_tiny_llama(tmp_path / "m", vocab_size=300, max_positions=64), device="cpu",
                   dtype="float32")
    tok = lm.tokenizer

    def reference(req: Request) -> bool:
        c, k = encode_pair(tok, req.context, req.continuation)
        with torch.no_grad():
            logits = lm.model(torch.tensor([c + k[:-1]])).logits[0]
        return all(int(logits[len(c) - 1 + j].argmax()) == t for j, t in enumerate(k))

    reqs = [Request(c, k) for c in ["金融商品取引業者等は", "【問題】\n", "センテンス: 業績", "abc "]
            for k in ["A", " positive", "の", "有価証券"]]
    for c in ["金融商品取引業者等は", "【問題】\n", "センテンス: 業績", "abc ", "The quick", "回答:"]:
        ids = lm.tok_encode(c)
        with torch.no_grad():
            nxt = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
        s = tok.decode([nxt])
        if encode_pair(tok, c, s)[1] == [nxt]:
            reqs.append(Request(c, s))  # the model's own next token: greedy
    out = lm.loglikelihood(reqs)
    flags = [g for _, g in out]
    assert flags == [reference(r) for r in reqs]
    assert True in flags and False in flags
    prefix = HFLM(lm.model, tok, mode="prefix").loglikelihood(reqs)
    assert [g for _, g in prefix] == flags
    assert [ll for ll, _ in prefix] == pytest.approx([ll for ll, _ in out], abs=1e-4)


def test_entries_ask_for_outside_files_and_the_judge_host(tmp_path: Path) -> None:
    from finrecipe.node import CheckContext
    from finrecipe.stages.base import get_kind

    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    cc = CheckContext(node="eval", base_dir=lambda sub: recipe_dir, error=lambda msg, sub: ValueError(msg),  # type: ignore[arg-type,return-value]
                      roots=(recipe_dir,))
    kind = get_kind("evaluate")
    cfg = kind.Config.model_validate({"models": ["m"], "tasks": [
        {"suite": "jfin", "data_dir": str(tmp_path / "jfin-data")},
        {"suite": "jfin", "data_dir": "download"},
        {"custom": "exams/mine.jsonl"},                       # inside the recipe's directory: nothing to ask
        {"custom": "../shared/exam.jsonl"},
        {"files": ["held.txt", str(tmp_path / "other.txt")]},
        {"generate": "p.txt", "judge": {"url": "https://Judge.example:8443/v1", "model": "j"}}]})
    reqs = kind.requests(cfg, cc)
    assert [(r.kind, r.what) for r in reqs] == [
        ("path", str(tmp_path / "jfin-data")), ("path", str(recipe_dir / ".." / "shared" / "exam.jsonl")),
        ("path", str(tmp_path / "other.txt")), ("host", "judge.example")]
    assert reqs[0].why.startswith("stages.eval.tasks.0.data_dir reads ") and reqs[0].option.startswith("--allow-path ")
    assert reqs[-1].why == "stages.eval.tasks.5.judge.url sends prompts and answers to judge.example"
    assert reqs[-1].option == "--allow-judge judge.example"


def test_judge_key_comes_from_the_user_not_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finrecipe.errors import FinrecipeError
    from finrecipe.eval.suites import generate
    from finrecipe.eval.suites.generate import JudgeSpec, run_generation

    (tmp_path / "p.txt").write_text("金利とは?\n", encoding="utf-8")
    monkeypatch.setenv("RECIPE_VAR", "recipe-secret")
    monkeypatch.setenv("USER_VAR", "user-secret")
    seen: list[dict[str, str]] = []

    def post(url: str, body: dict, headers: dict[str, str], timeout: float) -> dict:
        seen.append(headers)
        return {"choices": [{"message": {"content": "評価: [[6]]"}}]}

    monkeypatch.setattr(generate, "_post_json", post)
    judge = JudgeSpec(url="http://127.0.0.1:9/v1", model="j", api_key_env="RECIPE_VAR")
    with pytest.raises(FinrecipeError, match=r"judge.api_key_env: 'RECIPE_VAR' is named by the recipe.*--judge-key-env"):
        run_generation(FakeLM(), tmp_path / "p.txt", out_file=tmp_path / "g.jsonl", judge=judge)
    r = run_generation(FakeLM(), tmp_path / "p.txt", out_file=tmp_path / "g.jsonl", judge=judge, key_env="USER_VAR")
    assert r.value == 6 and seen == [{"Authorization": "Bearer user-secret"}]
