"""Golden prompt strings for japanese-lm-fin-harness, written out by hand from the harness's task files
(pfnet-research/japanese-lm-fin-harness: jlm_fin_eval/tasks/<task>/<task>-1.0-<v>.yaml and utils.py,
chabsa/*.yaml Jinja templates). Each string is description + doc_to_text as lm-eval 0.4 builds a 0-shot
context; the choices and gold index follow doc_to_choice / doc_to_target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finrecipe.eval.tasks import jfin

DATA = Path("/work/shared/data/japanese-lm-fin-harness")
needs_data = pytest.mark.skipif(not (DATA / "cma_basics.json").is_file(), reason="shared jfin data absent")

CMA_Q = "日本経済に関する次の記述のうち、正しくないものはどれか。"
CMA_C = [
    "実質GDP（実質国内総生産）とは、物価変動の影響を除いた生産活動の水準のことである。",
    "インフレーションは一般物価水準の持続的な上昇を意味する。",
    "銀行等の金融仲介機関が中心になって資金の融通を媒介する形態を間接金融という。",
    "日本銀行による財政政策はマネーサプライの増減を通じて物価水準を調整する政策である。",
]
LLAMA2 = ("<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as "
          "possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
          "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
          "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain "
          "why instead of answering something not correct. If you don't know the answer to a question, please "
          "don't share false information.\n<</SYS>>\n\n\n")

CMA_GOLDEN = {
    "default": ("以下の問題の適切な答えを選択肢から選んでアルファベットで答えなさい。\n\n\n"
                "【問題】\n日本経済に関する次の記述のうち、正しくないものはどれか。\n\n【選択肢】\n"
                f"A: {CMA_C[0]}\nB: {CMA_C[1]}\nC: {CMA_C[2]}\nD: {CMA_C[3]}\n\n【答え】\n",
                ["A", "B", "C", "D"], 3),
    "0.1": ("[問題]に対する[答え]を[選択肢]の中から選んでください。\n\n\n"
            f"[問題]:{CMA_Q}\n[選択肢]:[{CMA_C[0]}, {CMA_C[1]}, {CMA_C[2]}, {CMA_C[3]}]\n[答え]:", CMA_C, 3),
    "0.1.2": ("[問題]に対する[答え]を[選択肢]の中からアルファベットで選んでください。\n\n\n"
              f"[問題]:{CMA_Q}\n[選択肢]:[A:{CMA_C[0]}, B:{CMA_C[1]}, C:{CMA_C[2]}, D:{CMA_C[3]}]\n[答え]:",
              ["A", "B", "C", "D"], 3),
    "0.2": ("質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。なお、回答は選択肢の番号(例:0)でするものとします。\n\n\n"
            f"質問:{CMA_Q}\n選択肢:0.{CMA_C[0]},1.{CMA_C[1]},2.{CMA_C[2]},3.{CMA_C[3]}\n回答:",
            ["0", "1", "2", "3"], 3),
    "0.2.1": ("与えられた選択肢の中から、最適な答えを選んでください。\n\n\n"
              f"質問:{CMA_Q}\n選択肢:\n- {CMA_C[0]}\n- {CMA_C[1]}\n- {CMA_C[2]}\n- {CMA_C[3]}\n回答:", CMA_C, 3),
    "0.3": ("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
            "### 指示:\n与えられた選択肢の中から、最適な答えを選んでください。\n\n\n"
            f"### 入力:\n{CMA_Q}\n出力は以下から選択してください：\n- {CMA_C[0]}\n- {CMA_C[1]}\n- {CMA_C[2]}\n"
            f"- {CMA_C[3]}\n\n### 応答:\n", CMA_C, 3),
    "0.4": ("ユーザー: 与えられた選択肢の中から、最適な答えを選んでください。<NL>システム: 分かりました。<NL>"
            f"ユーザー: 質問：{CMA_Q}<NL>選択肢：<NL>- {CMA_C[0]}<NL>- {CMA_C[1]}<NL>- {CMA_C[2]}<NL>- {CMA_C[3]}"
            "<NL>システム: ", CMA_C, 3),
    "0.5": ("ユーザー: 与えられた選択肢の中から、最適な答えを選んでください。\nシステム: 分かりました。\n\n"
            f"ユーザー: 質問：{CMA_Q}\n選択肢：\n- {CMA_C[0]}\n- {CMA_C[1]}\n- {CMA_C[2]}\n- {CMA_C[3]}"
            "\nシステム: ", CMA_C, 3),
    "0.6": (LLAMA2 + "与えられた選択肢の中から、最適な答えを選んでください。\n\n"
            f"質問：{CMA_Q}出力は以下から選択してください：\n- {CMA_C[0]}\n- {CMA_C[1]}\n- {CMA_C[2]}\n- {CMA_C[3]} [/INST] ",
            CMA_C, 3),
}


@needs_data
@pytest.mark.parametrize("version", jfin.VERSIONS)
def test_cma_basics_first_item_every_version(version: str) -> None:
    doc = jfin.load_docs("cma_basics", DATA)[0]
    p = jfin.get_prompt("cma_basics", version)
    ctx, choices, gold = CMA_GOLDEN[version]
    assert p.context(doc) == ctx
    assert p.doc_to_choice(doc) == choices
    assert p.gold(doc) == gold
    assert p.target_delimiter == ""


SS_Q = "次の文章について、正しければ○と、正しくなければ×と答えよ。"
SS_CTX = "外務員は、その所属する金融商品取引業者等に代わって、有価証券の売買等法律に規定する行為に関し、一切の裁判上の行為を行う権限を有するものとみなされる。"


@needs_data
def test_security_sales_1_first_item() -> None:
    doc = jfin.load_docs("security_sales_1", DATA)[0]
    p = jfin.get_prompt("security_sales_1")
    assert p.context(doc) == ("以下の問題の適切な答えを選択肢から選んでアルファベットで答えなさい。\n\n\n"
                              f"【問題】\n{SS_Q}\n{SS_CTX}\n\n【選択肢】\nA: ○\nB: ×\n\n【答え】\n")
    assert p.doc_to_choice(doc) == ["A", "B"] and p.gold(doc) == 1
    p5 = jfin.get_prompt("security_sales_1", "0.5")
    assert p5.context(doc) == ("ユーザー: 与えられた選択肢の中から、最適な答えを選んでください。\nシステム: 分かりました。\n\n"
                               f"ユーザー: 質問：{SS_Q}\n{SS_CTX}\n選択肢：\n- ○\n- ×\nシステム: ")
    assert p5.doc_to_choice(doc) == ["○", "×"] and p5.gold(doc) == 1


@needs_data
def test_fp2_first_item() -> None:
    raw = json.loads((DATA / "fp2.json").read_text(encoding="utf-8"))["data"][0]
    q, c = raw["question"], raw["context"]
    doc = jfin.load_docs("fp2", DATA)[0]
    p = jfin.get_prompt("fp2")
    assert p.context(doc) == f"以下の問題の適切な答えを選択肢から選んで１～４の数字で答えなさい。\n\n\n【問題】\n{q}\n{c}\n\n【答え】\n"
    assert p.doc_to_choice(doc) == ["１", "２", "３", "４"] and p.gold(doc) == 3
    p12 = jfin.get_prompt("fp2", "0.1.2")
    assert p12.context(doc) == ("[問題]に対する[答え]を[選択肢]の中からアルファベットで選んでください。\n\n\n"
                                f"[問題]:{q}\n{c}\n[選択肢]:[A:１, B:２, C:３, D:４]\n[答え]:")
    assert p12.doc_to_choice(doc) == ["A", "B", "C", "D"] and p12.gold(doc) == 3
    assert jfin.get_prompt("fp2", "0.2.1").context(doc) == f"与えられた選択肢の中から、最適な答えを選んでください。\n\n\n質問:{q}\n{c}\n\n回答:"
    assert jfin.get_prompt("fp2", "0.3").context(doc).endswith(f"### 入力:\n{q}\n{c}\n\n### 応答:\n")
    assert jfin.get_prompt("fp2", "0.4").context(doc).endswith(f"<NL>ユーザー: {q}\n{c}<NL>システム: ")
    assert jfin.get_prompt("fp2", "0.6").context(doc) == (
        LLAMA2 + f"与えられた選択肢の中から、最適な答えを選んでください。\n\n質問：{q}\n{c} [/INST] ")


@needs_data
def test_cpa_audit_loader_and_first_items() -> None:
    docs = jfin.load_docs("cpa_audit", DATA)
    assert len(docs) == 398  # 408 questions, 10 flagged abnormal (NOTICE.md)
    d = docs[1]
    assert d["choices"]["text"] == ["アイ", "アウ", "アエ", "イウ", "イエ", "ウエ"] and d["answer"] == 3
    assert d["context"].startswith("ア: 得意先の売上債権に対する") and "\nイ: 決算日における" in d["context"]
    p = jfin.get_prompt("cpa_audit")
    ctx = p.context(d)
    assert ctx.startswith("以下の問題の答えとして適切な記号の組み合わせを選択肢から選んでアルファベットで答えなさい。\n\n\n【問題】\n"
                          "次の記述のうち，虚偽表示に該当する状況を示したものの組合せとして，最も適切な番号を一つ選びなさい。\nア: ")
    assert ctx.endswith("\n\n【選択肢】\nA: アイ\nB: アウ\nC: アエ\nD: イウ\nE: イエ\nF: ウエ\n\n【答え】\n")
    assert p.gold(d) == 3
    p6 = jfin.get_prompt("cpa_audit", "0.6")
    assert "与えられた答えの組み合わせの選択肢の中から、最適な選択肢を選んでください。\n\n質問：" in p6.context(d)
    assert jfin.get_prompt("cpa_audit", "0.1").description == \
        "[問題]に対する[答え]をとして適切な記号の組み合わせを[選択肢]の中から選んでください。\n\n\n"


def _chabsa_dir(tmp_path: Path) -> Path:
    d = tmp_path / "chABSA-dataset"
    d.mkdir()
    (d / "e00001_ann.json").write_text(json.dumps({"header": {}, "sentences": [
        {"sentence_id": 0, "sentence": "当期の業績は増収となりました",
         "opinions": [{"target": "業績", "polarity": "positive"}, {"target": "当期", "polarity": "neutral"}]},
    ]}, ensure_ascii=False), encoding="utf-8")
    (d / "e00002_ann.json").write_text(json.dumps({"sentences": [
        {"sentence": "売上は減少した", "opinions": [{"target": "売上", "polarity": "negative"}]}]},
        ensure_ascii=False), encoding="utf-8")
    return tmp_path


def test_chabsa_templates(tmp_path: Path) -> None:
    docs = jfin.load_docs("chabsa", _chabsa_dir(tmp_path))
    assert [(d["target"], d["polarity"]) for d in docs] == [("業績", "positive"), ("当期", "neutral"),
                                                            ("売上", "negative")]
    p = jfin.get_prompt("chabsa")
    assert p.context(docs[0]) == ("以下のセンテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。\n\n\n"
                                  "センテンス: 当期の業績は増収となりました\nターゲット: 業績\n回答:")
    assert p.target_delimiter == " " and p.doc_to_choice(docs[0]) == ["positive", "negative"]
    assert [p.gold(d) for d in docs] == [0, -100, 1]
    p3 = jfin.get_prompt("chabsa", "0.3")
    assert p3.target_delimiter == ""
    assert p3.context(docs[2]).endswith("### 入力:\nセンテンス:売上は減少した\nターゲット:売上\n\n### 応答:\n\n")
    p1 = jfin.get_prompt("chabsa", "0.1")
    assert p1.context(docs[2]).endswith("[センテンス]: 売上は減少した\nターゲット]: 売上\n[答え]:")
    assert jfin.get_prompt("chabsa", "0.1.2").resolved_version == "0.1"
    assert jfin.get_prompt("chabsa", "0.4").context(docs[2]).endswith(
        "<NL>センテンス: 売上は減少した<NL>ターゲット: 売上<NL>システム:")
    assert jfin.get_prompt("chabsa", "0.6").context(docs[2]) == (
        LLAMA2 + "与えられたセンテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。\n\n"
        "センテンス: 売上は減少した\nターゲット: 売上 [/INST]")


def test_missing_data_is_reported(tmp_path: Path) -> None:
    with pytest.raises(jfin.TaskDataMissing, match="fp2"):
        jfin.load_docs("fp2", tmp_path)


def test_harness_checkout_layout(tmp_path: Path) -> None:
    d = tmp_path / "jlm_fin_eval" / "datasets" / "fp2"
    d.mkdir(parents=True)
    (d / "data.json").write_text(json.dumps({"data": [{"id": 0, "question": "Q", "context": None,
        "choices": [{"id": 0, "text": "x"}, {"id": 1, "text": "y"}], "answer": 1, "comment": ""}]}),
        encoding="utf-8")
    docs = jfin.load_docs("fp2", tmp_path)
    assert jfin.get_prompt("fp2").context(docs[0]).endswith("【問題】\nQ\n\n【答え】\n")


def test_leaderboard_best_version() -> None:
    full = {t: 0.5 for t in jfin.TASKS}
    lb = jfin.leaderboard({"default": full, "0.3": {**full, "fp2": 0.8}})
    assert lb["best_version"] == "0.3"
    assert lb["average"] == pytest.approx(100 * (0.5 * 4 + 0.8) / 5)
    part = jfin.leaderboard({"default": {**full, "chabsa": None}})
    assert part["versions"]["default"]["missing"] == ["chabsa"]
    assert part["average"] == pytest.approx(50.0)


def test_download_with_checksums(tmp_path: Path) -> None:
    """The online path, with a fake fetcher (tests never touch the network)."""
    import io
    import zipfile

    from finrecipe.errors import DataError

    if not (DATA / "cpa_audit.xlsx").is_file():
        pytest.skip("shared jfin data absent")
    local = {path: (DATA / name).read_bytes() for name, (path, _sha) in jfin.PINNED_FILES.items()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("chABSA-dataset/e00001_ann.json", json.dumps({"sentences": [
            {"sentence": "s", "opinions": [{"target": "t", "polarity": "positive"}]}]}))
        z.writestr("chABSA-dataset/README.md", "x")
    calls: list[str] = []

    def fetch(url: str) -> bytes:
        calls.append(url)
        if url == jfin.CHABSA_URL:
            return buf.getvalue()
        assert f"/{jfin.PINNED_COMMIT}/" in url
        return local[url.split(f"/{jfin.PINNED_COMMIT}/", 1)[1]]

    d = jfin.download_data(tmp_path / "cache", fetch=fetch)
    assert len(calls) == 5
    assert len(jfin.load_docs("fp2", d)) == 475 and len(jfin.load_docs("chabsa", d)) == 1
    jfin.download_data(tmp_path / "cache", fetch=fetch)  # cached: no new downloads
    assert len(calls) == 5

    def corrupt(url: str) -> bytes:
        return b"tampered"

    with pytest.raises(DataError, match="sha256"):
        jfin.download_data(tmp_path / "cache2", fetch=corrupt)
    assert not (tmp_path / "cache2" / f"jfin-{jfin.PINNED_COMMIT}").exists()
