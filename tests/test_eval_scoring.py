"""The scorer against a plain, unbatched transformers float32 reference, and the metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from finrecipe.eval.scoring import (  # noqa: E402
    Request,
    Scorer,
    chabsa_f1,
    encode_pair,
    macro_f1,
    mc_predictions,
    mean_stderr,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    from finrecipe.eval.model import load_model
    from finrecipe.eval.tiny import build_tiny_llama

    d = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", max_positions=48, vocab_size=400)
    return load_model(d, device="cpu", dtype="float32")


def _reference(model: object, tok: object, req: Request, max_len: int) -> float:
    """lm-eval's HF path written out plainly: one request, one full forward pass."""
    ctx, cont = req.context, req.continuation
    if ctx == "":
        c_ids = [tok.bos_token_id]
        k_ids = tok(cont, add_special_tokens=False)["input_ids"]
    else:
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        k_ids = whole[len(c_ids):]
    full = (c_ids + k_ids)[-(max_len + 1):]
    inp = torch.tensor([full[:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(inp).logits[0].float(), dim=-1)
    start = inp.shape[1] - len(k_ids)
    return sum(logp[start + j, k_ids[j]].item() for j in range(len(k_ids)))


REQS = [Request(c, k) for c in ["【問題】\n次の記述のうち\n\n【答え】\n", "センテンス: 業績 \nターゲット: 業績\n回答:",
                                "The quick brown fox", "", "abc def " * 12]
        for k in ["A", "B", " positive", "negative", "アイ", "\n１"]]


@pytest.mark.parametrize("mode,batch_tokens,max_batch", [("packed", 1, 1), ("packed", 64, 2), ("packed", 256, 3),
                                                         ("packed", 100000, 64), ("prefix", 4096, 64)])
def test_matches_unbatched_reference(tiny: tuple[object, object], mode: str, batch_tokens: int,
                                     max_batch: int) -> None:
    model, tok = tiny
    ref = [_reference(model, tok, r, 48) for r in REQS]
    got = Scorer(model, tok, batch_tokens=batch_tokens, max_batch=max_batch, mode=mode).loglikelihoods(REQS)
    for r, g in zip(ref, got, strict=True):
        assert abs(r - g) < 1e-4
    # same argmax per context group
    for i in range(0, len(REQS), 6):
        assert max(range(6), key=lambda j: ref[i + j]) == max(range(6), key=lambda j: got[i + j])


def test_whitespace_boundary_moves_to_continuation(tiny: tuple[object, object]) -> None:
    _, tok = tiny
    ctx, cont = encode_pair(tok, "回答: \n", "positive")
    assert ctx == tok("回答:", add_special_tokens=False)["input_ids"]
    whole = tok("回答: \npositive", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole
    # empty context: the BOS token stands in
    c2, k2 = encode_pair(tok, "", " x")
    assert c2 == [tok.bos_token_id] and k2 == tok(" x", add_special_tokens=False)["input_ids"]


def test_left_truncation_uses_own_sequence(tiny: tuple[object, object]) -> None:
    model, tok = tiny
    long = Request("abc def ghi " * 40, " jkl")
    ref = _reference(model, tok, long, 48)
    for mode in ("packed", "prefix"):
        got = Scorer(model, tok, mode=mode).loglikelihoods([long, Request("abc", " d")])
        assert abs(ref - got[0]) < 1e-4


def test_mc_predictions_acc_norm_uses_characters() -> None:
    # lls: choice 0 longer but per-character better
    pred, pred_norm = mc_predictions([-4.0, -3.0], ["abcd", "a"])
    assert pred == 1 and pred_norm == 0
    assert mc_predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties: first


def test_mean_stderr_is_sample_stderr() -> None:
    xs = [1.0, 0.0, 1.0, 1.0]
    mu = 0.75
    expect = math.sqrt(sum((x - mu) ** 2 for x in xs) / 3) / 2
    assert mean_stderr(xs) == pytest.approx(expect)
    assert mean_stderr([1.0]) is None


def test_chabsa_f1_like_sklearn_times_1_5() -> None:
    # golds: 0 positive, 1 negative, -100 neutral (never predicted)
    golds = [0, 0, 1, 1, -100, -100]
    preds = [0, 1, 1, 1, 0, 1]
    # per label: 0: tp1 fp1 fn1 -> f1 .5; 1: tp2 fp2 fn0 -> 4/6; -100: 0
    assert macro_f1(golds, preds) == pytest.approx((0.5 + 4 / 6 + 0) / 3)
    assert chabsa_f1(golds, preds) == pytest.approx((0.5 + 4 / 6) / 2)
    # without neutral items the harness's ×1.5 overshoots (its behaviour, reproduced)
    assert chabsa_f1([0, 1], [0, 1]) == pytest.approx(1.5)


def test_mc_metrics_on_hand_made_predictions() -> None:
    from finrecipe.eval.mc import MCItem, mc_metrics

    items = [MCItem("q", ["A", "B"], 0), MCItem("q", ["A", "BBBB"], 1), MCItem("q", ["x", "y"], -100)]
    lls = [[-1.0, -2.0], [-1.0, -2.0], [-1.0, -3.0]]
    m = mc_metrics(items, lls, f1=True)
    assert m["acc"] == pytest.approx(1 / 3)  # neutral (-100) is always wrong
    assert m["acc_norm"] == pytest.approx(2 / 3)  # item 2: -2/4 > -1/1
    assert m["f1"] == pytest.approx(chabsa_f1([0, 1, -100], [0, 0, 0]))


def test_eval_cli_runs_on_tiny_model(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from finrecipe.cli import main
    from finrecipe.eval.tiny import build_tiny_llama

    data = Path("/work/shared/data/japanese-lm-fin-harness")
    if not (data / "fp2.json").is_file():
        pytest.skip("shared jfin data absent")
    m = build_tiny_llama(tmp_path / "tinym", vocab_size=300)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["eval", str(m), "--data-dir", str(data), "--limit", "3",
                                    "--versions", "default,0.2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "missing" in res.output and "fp2" in res.output
    import json

    r = json.loads(out.read_text())["models"]["tinym"]
    assert r["jfin"]["tasks"]["chabsa"].get("missing")
    assert r["jfin_versions"]["0.2"]["fp2"]["n"] == 3


def test_bootstrap_f1_stderr_fast_path_equals_plain() -> None:
    import random

    from finrecipe.eval.scoring import bootstrap_stderr

    rnd = random.Random(0)
    golds = [rnd.choice([0, 1, -100]) for _ in range(300)]
    preds = [rnd.choice([0, 1]) for _ in range(300)]
    fast = bootstrap_stderr(golds, preds, chabsa_f1, iters=50)
    slow = bootstrap_stderr(golds, preds, lambda g, p: chabsa_f1(g, p), iters=50)
    assert fast is not None and fast > 0
    assert fast == pytest.approx(slow, rel=1e-9)


@pytest.mark.parametrize("arch", ["gpt_neox"])  # qwen2: the shared word-level fixture tokenizer loads as Qwen2Tokenizer and yields no ids
def test_other_architectures_match_reference(tiny_model: object, arch: str) -> None:
    from finrecipe.eval.model import load_model

    model, tok = load_model(tiny_model(arch), device="cpu", dtype="float32")  # type: ignore[operator]
    reqs = [Request(c, k) for c in ["w3 w4 w5 ", "w9 w8 w7 w6 w5"] for k in [" w10", " w11 w12", " w13 w14 w15"]]
    ref = [_reference(model, tok, r, 128) for r in reqs]
    for mode in ("packed", "prefix"):
        got = Scorer(model, tok, mode=mode).loglikelihoods(reqs)
        assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 1e-4
    from finrecipe.errors import DataError

    with pytest.raises(DataError, match="adds no token"):
        Scorer(model, tok).loglikelihoods([Request("w3 w4", "w5")])
