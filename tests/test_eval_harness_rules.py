"""The japanese-lm-fin-harness / lm-evaluation-harness 0.4.9.1 rules finrecipe must match (issue 15):
cpa_audit's empty choices, the leaderboard rule, Gemma's BOS, chABSA's real file layout."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from finrecipe.eval.tasks import jfin

DATA = Path("/work/shared/data/japanese-lm-fin-harness")


# -- cpa_audit: an empty sixth choice is the text "nan" (pandas NaN cast to string by datasets) ---------

def _cpa_xlsx(path: Path) -> None:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["key", "q_no", "question", "ア", "イ", "ウ", "エ", "オ", "カ", "a_no", 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
               "abnormal_flg"])
    ws.append(["R5_1", 1.0, "問1", "甲", "乙", None, None, None, None, 2.0, "アイ", "アウ", "イウ", "イエ", "ウエ", None, None])
    ws.append(["R5_2", 2.0, "問2", "丙", None, None, None, None, None, 1.0, "ア", "イ", "ウ", "エ", "オ", "カ", 1.0])
    ws.append(["R5_3", 3.0, None, None, None, None, None, None, None, 1.0, "a", "b", "c", "d", "e", "f", None])
    wb.save(str(path))


def test_cpa_empty_choice_reads_nan(tmp_path: Path) -> None:
    _cpa_xlsx(tmp_path / "cpa_audit.xlsx")
    docs = jfin.load_docs("cpa_audit", tmp_path)
    assert len(docs) == 1  # the abnormal row and the row without a question are left out
    d = docs[0]
    assert d["choices"]["text"] == ["アイ", "アウ", "イウ", "イエ", "ウエ", "nan"]
    assert d["context"] == "ア: 甲\nイ: 乙" and d["answer"] == 1
    assert jfin.get_prompt("cpa_audit").context(d).endswith("E: ウエ\nF: nan\n\n【答え】\n")
    p = jfin.get_prompt("cpa_audit", "0.3")
    assert p.doc_to_choice(d)[5] == "nan" and "- nan\n" in p.context(d)


@pytest.mark.skipif(not (DATA / "cpa_audit.xlsx").is_file(), reason="shared jfin data absent")
def test_cpa_real_file_has_38_items_with_an_empty_sixth_choice() -> None:
    docs = jfin.load_docs("cpa_audit", DATA)
    texts = [d["choices"]["text"] for d in docs]
    assert len(docs) == 398 and sum(t[5] == "nan" for t in texts) == 38
    assert not any("None" in t for t in texts)


# -- the leaderboard: make_leaderboard.py's rule ------------------------------------------------------

def test_leaderboard_leaves_out_zero_tasks_and_keeps_the_first_strictly_better_version() -> None:
    default = {"chabsa": 0.40, "cma_basics": 0.0, "cpa_audit": 0.30, "fp2": 0.35, "security_sales_1": 0.35}
    v03 = dict.fromkeys(jfin.TASKS, 0.28)
    lb = jfin.leaderboard({"default": default, "0.3": v03})
    # the case: harness 35.0 with "default" (cma_basics = 0 is not averaged); 28.0 otherwise
    assert lb["best_version"] == "default" and lb["average"] == pytest.approx(35.0)
    assert lb["versions"]["default"]["left_out"] == ["cma_basics"] and lb["versions"]["0.3"]["average"] == pytest.approx(28.0)
    # ties: the first version keeps its place; a later one must be strictly better
    tie = jfin.leaderboard({"0.5": v03, "0.2": v03, "0.4": {**v03, "fp2": 0.2801}})
    assert tie["best_version"] == "0.4"
    assert jfin.leaderboard({"0.5": v03, "0.2": v03})["best_version"] == "0.5"
    # nothing above zero: no best version, as the harness lists no row for such a model
    zero = jfin.leaderboard({"default": dict.fromkeys(jfin.TASKS, 0.0)})
    assert zero["best_version"] is None and zero["average"] is None
    assert zero["versions"]["default"]["average"] == 0.0
    # a task without data is not a zero: it has no result (and the version is incomplete)
    part = jfin.leaderboard({"default": {**v03, "chabsa": None}})
    assert part["average"] == pytest.approx(28.0) and part["versions"]["default"]["missing"] == ["chabsa"]


# -- Gemma: lm-eval 0.4.9.1 encodes with special tokens when model_type contains "gemma" -------------

def test_bos_rule_follows_the_model_type() -> None:
    from types import SimpleNamespace

    from finrecipe.eval.scoring import adds_bos

    for t in ("gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma"):
        assert adds_bos(SimpleNamespace(model_type=t)), t
    for t in ("llama", "qwen2", "mistral", "", None):
        assert not adds_bos(SimpleNamespace(model_type=t)), t
    assert not adds_bos(None)


def test_gemma_scores_with_bos_like_lm_eval(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import transformers as tf

    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.requests import Request
    from finrecipe.eval.tiny import build_tokenizer

    d = tmp_path / "gemma"
    build_tokenizer(d, vocab_size=300, bos_with_special_tokens=True)
    tok = tf.AutoTokenizer.from_pretrained(str(d))
    cfg = tf.GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    tf.GemmaForCausalLM(cfg).save_pretrained(str(d))
    lm = HFLM.load(d, device="cpu", dtype="float32")
    assert lm.add_bos and lm.tok_encode("金融")[0] == tok.bos_token_id

    ctx, cont = "センテンス: 業績\n回答:", " positive"
    # lm-eval's _encode_pair with tok_encode(add_special_tokens=True): BOS leads the context
    c_ids = tok(ctx, add_special_tokens=True)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=True)["input_ids"]
    k_ids = whole[len(c_ids):]
    assert c_ids[0] == tok.bos_token_id and tok.bos_token_id not in k_ids
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([c_ids + k_ids[:-1]])).logits[0].float(), -1)
    ref = sum(logp[len(c_ids) - 1 + j, t].item() for j, t in enumerate(k_ids))
    (got, _), = lm.loglikelihood([Request(ctx, cont)])
    assert got == pytest.approx(ref, abs=1e-4)
    (no_bos, _), = HFLM(lm.model, lm.tokenizer, add_bos=False).loglikelihood([Request(ctx, cont)])
    assert abs(no_bos - ref) > 1e-3  # the BOS makes a difference, so the rule is observable


def test_llama_scores_without_bos(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.tiny import build_tiny_llama

    lm = HFLM.load(build_tiny_llama(tmp_path / "m", vocab_size=300, max_positions=64), device="cpu",
                   dtype="float32")
    assert lm.add_bos is False


# -- chABSA: the Kaggle distribution's layout ---------------------------------------------------------

def _ann(sentence: str, target: str, polarity: str) -> bytes:
    return json.dumps({"header": {"document_id": "x"}, "sentences": [
        {"sentence_id": 0, "sentence": sentence, "opinions": [{"target": target, "polarity": polarity}]}]},
        ensure_ascii=False).encode("utf-8")


FILES = {"E00008_ann.json": _ann("売上は増加", "売上", "positive"),  # any *.json, not only e*_ann.json
         "e00010_ann.json": _ann("利益は減少", "利益", "negative")}
EXPECTED = [("売上", "positive"), ("利益", "negative")]


def _kaggle_zip(extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, blob in FILES.items():
            z.writestr(f"chABSA-dataset/{name}", blob)
        for name, blob in (extra or {}).items():
            z.writestr(name, blob)
    return buf.getvalue()


@pytest.mark.parametrize("where", ["chABSA-dataset", "chabsa/chABSA-dataset", "chabsa"])
def test_chabsa_unpacked_kaggle_layout(tmp_path: Path, where: str) -> None:
    d = tmp_path / where
    d.mkdir(parents=True)
    for name, blob in FILES.items():
        (d / name).write_bytes(blob)
    docs = jfin.load_docs("chabsa", tmp_path)
    assert [(x["target"], x["polarity"]) for x in docs] == EXPECTED and [x["id"] for x in docs] == [0, 1]


@pytest.mark.parametrize("where", ["chabsa.zip", "chabsa/archive.zip"])
def test_chabsa_kaggle_zip_read_in_place(tmp_path: Path, where: str) -> None:
    p = tmp_path / where
    p.parent.mkdir(parents=True, exist_ok=True)
    # the glob the harness uses is chABSA-dataset/*.json: other members are not documents
    p.write_bytes(_kaggle_zip({"README.md": b"x", "chABSA-dataset/sub/x.json": b"{}"}))
    docs = jfin.load_docs("chabsa", tmp_path)
    assert [(x["target"], x["polarity"]) for x in docs] == EXPECTED


def test_chabsa_missing_names_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(jfin.TaskDataMissing) as e:
        jfin.load_docs("chabsa", tmp_path)
    msg = str(e.value)
    assert "https://www.kaggle.com/datasets/takahirokubo0/chabsa" in msg and "chabsa.zip" in msg
    assert f"{tmp_path / 'chABSA-dataset'}/*.json" in msg and "\n" not in msg
    (tmp_path / "chabsa.zip").write_bytes(b"not a zip")
    with pytest.raises(jfin.DataError, match=r"chabsa.zip: not a zip file .*takahirokubo0/chabsa"):
        jfin.load_docs("chabsa", tmp_path)
