"""The `evaluate` stage kind, custom multiple-choice / generation tasks, perplexity and the judge."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from finrecipe.stages.base import get_kind  # noqa: E402
from finrecipe.types import ModelRef, StageContext  # noqa: E402

DATA = Path("/work/shared/data/japanese-lm-fin-harness")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import transformers as tf

    from finrecipe.eval.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("evmodels")
    base = build_tiny_llama(root / "base", vocab_size=300, max_positions=256)
    out = {"base": base}
    for i, name in enumerate(["instruct", "domain"]):
        m = tf.AutoModelForCausalLM.from_pretrained(str(base))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(str(root / name))
        tf.AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(root / name))
        out[name] = root / name
    return out


def _files(d: Path) -> None:
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"question": "日本の首都は?", "choices": ["東京", "大阪"], "answer": 0},
        {"question": "1+1は?", "choices": ["1", "2", "3"], "answer": "2", "context": "算数"},
        {"question": "x?", "choices": ["a", "b"], "answer": "B"}]), encoding="utf-8")
    (d / "gen.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"prompt": "質問: 金利とは?", "answer": "利息"}, {"prompt": "A?", "answers": ["x", "y"]}]), encoding="utf-8")
    (d / "held.txt").write_text("金融商品取引業者等は、有価証券の売買の勧誘を行う者について。" * 4, encoding="utf-8")


def test_stage_end_to_end(models: dict[str, Path], tmp_path: Path) -> None:
    _files(tmp_path)
    kind = get_kind("evaluate")
    tasks: list[dict] = [{"custom": "mc.jsonl"},
                         {"custom": "gen.jsonl", "kind": "generation", "max_new_tokens": 4, "stop": ["\n"]},
                         {"files": ["held.txt"], "name": "held"}]
    if (DATA / "fp2.json").is_file():
        tasks.insert(0, {"suite": "jfin", "data_dir": str(DATA), "limit": 2, "versions": ["default", "0.2"],
                         "tasks": ["fp2", "chabsa"]})
    cfg = kind.Config.model_validate({"models": ["base", "instruct", "domain"], "reference": "base", "tasks": tasks,
                                      "analysis": {"base": "base", "vectors": ["instruct", "domain"]}})
    assert ("instruct", "model") in kind.inputs(cfg) and not kind.produces_model
    ctx = StageContext(node="eval", workdir=tmp_path, cache_dir=tmp_path / "cache", recipe_dir=tmp_path)
    res = kind.run(cfg, {n: ModelRef(n, p) for n, p in models.items()}, tmp_path / "out", ctx)
    m = res.metrics
    assert m["schema"] == "finrecipe.evaluate/1" and m["reference"] == "base"
    t = m["models"]["instruct"]["tasks"]
    assert t["custom:mc"]["n"] == 3 and 0 <= t["custom:mc"]["value"] <= 1
    assert t["custom:gen"]["metric"] == "exact_match" and "contains" in t["custom:gen"]["metrics"]
    assert t["ppl:held"]["metric"] == "bits_per_byte" and t["ppl:held"]["higher_is_better"] is False
    if (DATA / "fp2.json").is_file():
        assert t["fp2"]["n"] == 2 and "missing" in t["chabsa"]
        assert m["models"]["base"]["average_complete"] is False
        assert set(m["models"]["base"]["jfin_versions"]) == {"default", "0.2"}
    d = m["deltas"]["instruct"]
    assert d["custom:mc"] == pytest.approx(t["custom:mc"]["value"] - m["models"]["base"]["tasks"]["custom:mc"]["value"])
    assert m["deltas"]["base"]["ppl:held"] == 0.0
    assert m["analysis"]["pairs"][0]["a"] == "instruct" and -1 <= m["analysis"]["pairs"][0]["cosine"] <= 1
    assert Path(res.artifacts["analysis_heatmap_0"]).is_file() and Path(res.artifacts["results"]).is_file()
    gens = [json.loads(x) for x in Path(res.artifacts["generations_base_custom:gen"]).read_text().splitlines()]
    assert len(gens) == 2 and "\n" not in gens[0]["output"]
    json.dumps(res.to_json())  # serialisable for run.json


def test_config_errors() -> None:
    kind = get_kind("evaluate")
    with pytest.raises(ValidationError, match="reference"):
        kind.Config.model_validate({"models": ["a"], "reference": "b"})
    with pytest.raises(ValidationError, match="versoins"):
        kind.Config.model_validate({"models": ["a"], "tasks": [{"suite": "jfin", "versoins": ["0.3"]}]})
    with pytest.raises(ValidationError, match="say what to run"):
        kind.Config.model_validate({"models": ["a"], "tasks": [{"kind": "generation"}]})
    cfg = kind.Config.model_validate({"models": ["a"], "tasks": [{"perplexity": "heldout"}]})
    assert ("heldout", "dataset") in kind.inputs(cfg)


def test_custom_mc_render_and_errors(tmp_path: Path) -> None:
    from finrecipe.errors import DataError
    from finrecipe.eval.suites.custom import evaluate_multiple_choice, render_mc

    text, choices, gold = render_mc({"question": "Q", "choices": ["x", "y"], "answer": "y", "context": "C"})
    assert text == "C\nQ\nA. x\nB. y\n答え:" and choices == ["x", "y"] and gold == 1
    text2, _, _ = render_mc({"question": "Q", "choices": ["x"], "answer": 0}, template="問:{question}|{choices}",
                            choice_format="({index}){choice}")
    assert text2 == "問:Q|(0)x"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'answer'"):
        evaluate_multiple_choice(None, bad)


def test_perplexity_bits_per_byte_matches_manual(models: dict[str, Path], tmp_path: Path) -> None:
    from finrecipe.eval.lm import HFLM, rolling_windows
    from finrecipe.eval.suites.perplexity import bits_per_byte

    assert rolling_windows([5, 6, 7, 8, 9], 1, 2) == [([1, 5], [5, 6]), ([6, 7], [7, 8]), ([7, 8], [9])]
    lm = HFLM.load(models["base"], device="cpu", dtype="float32")
    model, tok = lm.model, lm.tokenizer
    text = "abc 金融 def"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inp = torch.tensor([[tok.bos_token_id] + ids[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(model(inp).logits[0].float(), -1)
    nll = -sum(lp[i, ids[i]].item() for i in range(len(ids)))
    r = bits_per_byte(lm, [text])
    assert r.value == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-5)
    assert r.higher_is_better is False and r.metric == "bits_per_byte"
    r2 = bits_per_byte(lm, [text], max_length=3)  # several windows: still finite and positive
    assert r2.value is not None and r2.value > 0 and r2.metrics and r2.metrics["tokens"] == len(ids)


class _Judge(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append(body)
        msg = {"choices": [{"message": {"content": "よい回答です。評価: [[7]]"}}]}
        data = json.dumps(msg).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a: object) -> None:
        return None


def test_generation_with_local_judge(models: dict[str, Path], tmp_path: Path) -> None:
    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.suites.generate import JudgeSpec, parse_score, run_generation

    assert parse_score("評価: [[10]]") == 10 and parse_score("score: 3") == 3 and parse_score("none") is None
    lm = HFLM.load(models["base"], device="cpu", dtype="float32")
    prompts = tmp_path / "p.txt"
    prompts.write_text("金利とは?\n株式とは?\n", encoding="utf-8")
    srv = HTTPServer(("127.0.0.1", 0), _Judge)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        r = run_generation(lm, prompts, out_file=tmp_path / "g.jsonl", max_new_tokens=3,
                           judge=JudgeSpec(url=f"http://127.0.0.1:{srv.server_port}/v1", model="stub"))
    finally:
        srv.shutdown()
    assert r.value == 7 and r.n == 2 and r.extra["note"] is None
    assert _Judge.seen[0]["model"] == "stub" and "金利とは?" in _Judge.seen[0]["messages"][0]["content"]
    rows = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [x["score"] for x in rows] == [7, 7]
    r0 = run_generation(lm, prompts, out_file=tmp_path / "g0.jsonl", max_new_tokens=2)
    assert r0.value is None and "no judge" in r0.extra["note"]


def test_evaluate_stage_in_a_recipe_and_report(tmp_path: Path) -> None:
    """merge_tiny + an evaluate stage, applied with the CLI: metrics land in run.json and the report."""
    import shutil

    from click.testing import CliRunner

    from finrecipe.cli import main

    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "recipes" / "assets", tmp_path / "assets")
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"question": "w3 w4", "choices": ["w10", "w11"], "answer": 0},
        {"question": "w5 w6", "choices": ["w12 w13", "w14"], "answer": 1}]), encoding="utf-8")
    (tmp_path / "held.txt").write_text("w3 w4 w5 w6 w7 w8 w9", encoding="utf-8")
    recipe = (repo / "recipes" / "merge_tiny.yaml").read_text(encoding="utf-8")
    recipe += """
  eval:
    type: evaluate
    models: [base, domain_instruct, final]
    reference: base
    tasks:
      - custom: mc.jsonl
        name: exam
      - files: [held.txt]
        name: held
    analysis: {base: base, vectors: [instruct, domain]}
"""
    (tmp_path / "r.yaml").write_text(recipe, encoding="utf-8")
    res = CliRunner().invoke(main, ["apply", "-q", str(tmp_path / "r.yaml")])
    assert res.exit_code == 0, res.output
    wd = tmp_path / "runs" / "merge_tiny"
    run = json.loads((wd / "run.json").read_text())
    ev = next(n for n in run["nodes"] if n["name"] == "eval")
    assert ev["status"] == "ran" and set(ev["inputs"]) >= {"base", "domain_instruct", "final"}
    m = ev["metrics"]
    assert m["models"]["final"]["tasks"]["custom:exam"]["n"] == 2
    assert m["deltas"]["final"]["ppl:held"] == pytest.approx(
        m["models"]["final"]["tasks"]["ppl:held"]["value"] - m["models"]["base"]["tasks"]["ppl:held"]["value"])
    # instruct and domain are independent random inits: their task vectors are far from parallel
    assert abs(m["analysis"]["pairs"][0]["cosine"]) < 0.9
    html = (wd / "report.html").read_text()
    assert "Evaluation: eval" in html and "custom:exam" in html and "data:image/png;base64," in html
    assert "Task-vector analysis" in (wd / "report.md").read_text()


def test_batched_greedy_generation_equals_one_at_a_time(models: dict[str, Path]) -> None:
    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.requests import GenerationRequest

    lm = HFLM.load(models["instruct"], device="cpu", dtype="float32")
    prompts = ["質問: 金利とは?", "A?", "金融商品取引業者等は、有価証券の売買の勧誘を行う者について", "x y z"]
    reqs = [GenerationRequest(p, max_new_tokens=6) for p in prompts]
    one = lm.generate_until(reqs, batch_size=1)
    many = lm.generate_until(reqs, batch_size=16)
    assert one == many and all(isinstance(o, str) for o in one)
