"""japanese-lm-fin-harness (pfnet-research): chabsa, cma_basics, cpa_audit, fp2, security_sales_1.

Prompt templates reproduce the harness's task files ``jlm_fin_eval/tasks/<task>/<task>-1.0-<v>.yaml``
and their ``utils.py`` (read from the public repository; written here from scratch). The 0-shot context
is ``description + doc_to_text(doc)``; ``target_delimiter`` is "" for the four exam tasks and " "
(lm-eval's default) for chabsa except prompt 0.3. chabsa has no 0.1.2 / 0.2.1 prompts; the harness's
leaderboard uses the most similar version (0.1 / 0.2) then, and so do we (``resolved_version``).
The security_sales_1 task files reference a ``utils.py`` with the same functions as cma_basics'.

Data layouts (``data_dir``): a checkout of the harness (``jlm_fin_eval/datasets/<task>/data.json``,
``jlm_fin_eval/datasets/cpa/CPA_AUDIT.xlsx``) or the flat copy (``fp2.json``, ``cma_basics.json``,
``security_sales_1.json``, ``cpa_audit.xlsx``). cpa_audit is read as the harness's dataset script reads
it through pandas and datasets (an empty cell is the text "nan"). chabsa: the harness's dataset script
downloads the Kaggle dataset ``takahirokubo0/chabsa`` and reads every ``chABSA-dataset/*.json`` in it;
finrecipe reads the same files from ``<data_dir>/chABSA-dataset/``, ``<data_dir>/chabsa/chABSA-dataset/``
or ``<data_dir>/chabsa/``, or straight from the Kaggle zip (``<data_dir>/chabsa.zip``, or any ``*.zip``
in ``<data_dir>/chabsa/``), in file-name order (the harness takes them in directory order, which only
matters with ``limit``). A task whose files are absent raises `TaskDataMissing` (reported as missing,
never as zero) naming where to get them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finrecipe.errors import DataError

TASKS = ("chabsa", "cma_basics", "cpa_audit", "fp2", "security_sales_1")
VERSIONS = ("default", "0.1", "0.1.2", "0.2", "0.2.1", "0.3", "0.4", "0.5", "0.6")
METRIC = {"chabsa": "f1", "cma_basics": "acc", "cpa_audit": "acc", "fp2": "acc", "security_sales_1": "acc"}

Doc = dict[str, Any]


class TaskDataMissing(DataError):
    """The data files of a task are not in the data directory."""


@dataclass(frozen=True)
class Prompt:
    """One task at one prompt version: how a document becomes a context, choices and a gold index."""

    task: str
    version: str
    resolved_version: str
    description: str
    doc_to_text: Callable[[Doc], str]
    doc_to_choice: Callable[[Doc], list[str]]
    doc_to_target: Callable[[Doc], str]
    target_delimiter: str

    def context(self, doc: Doc) -> str:
        return self.description + self.doc_to_text(doc)

    def gold(self, doc: Doc) -> int:
        """lm-eval: the target string's index among the choices, -100 when it is not one of them."""
        target = self.doc_to_target(doc)
        choices = self.doc_to_choice(doc)
        return choices.index(target) if target in choices else -100


# -- shared text pieces ----------------------------------------------------------------------------

_LLAMA2_SYS = (
    "<s>[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain "
    "why instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information.\n<</SYS>>\n\n\n"
)
_ALPACA = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n"
_BEST = "与えられた選択肢の中から、最適な答えを選んでください。"
_BEST_CPA = "与えられた答えの組み合わせの選択肢の中から、最適な選択肢を選んでください。"


def _ids(doc: Doc) -> list[int]:
    return list(doc["choices"]["id"])


def _texts(doc: Doc) -> list[str]:
    return list(doc["choices"]["text"])


def _q(doc: Doc) -> str:
    """question + "\n" (+ context + "\n" when the context is non-empty)."""
    s = doc["question"] + "\n"
    if doc["context"]:
        s += doc["context"] + "\n"
    return s


def _q_joined(doc: Doc) -> str:
    """question (+ "\n" + context when non-empty), as the 0.4/0.5/0.6 templates build it."""
    s = doc["question"]
    if doc["context"]:
        s += "\n" + doc["context"]
    return s


# choices / targets
def _alpha_choices(doc: Doc) -> list[str]:
    return [chr(i + 65) for i in _ids(doc)]


def _alpha_target(doc: Doc) -> str:
    return chr(int(doc["answer"]) + 65)


def _text_choices(doc: Doc) -> list[str]:
    return _texts(doc)


def _text_target(doc: Doc) -> str:  # cma/cpa/security doc_to_target_01
    return [t for i, t in zip(_ids(doc), _texts(doc), strict=False) if i == doc["answer"]][0]


def _fp2_text_target(doc: Doc) -> str:  # fp2 doc_to_target_00
    return _texts(doc)[_ids(doc).index(doc["answer"])]


def _fp2_alpha_choices(doc: Doc) -> list[str]:  # fp2 doc_to_choices_01_2
    return [chr(i + 65) for i, _ in enumerate(_ids(doc))]


def _fp2_alpha_target(doc: Doc) -> str:  # fp2 doc_to_target_01_2
    return chr(_ids(doc).index(doc["answer"]) + 65)


def _num_choices(doc: Doc) -> list[str]:
    return [str(i) for i in _ids(doc)]


def _num_target(doc: Doc) -> str:
    return [str(i) for i in _ids(doc) if i == doc["answer"]][0]


# doc_to_text of the exam tasks (cma_basics / cpa_audit / security_sales_1 share these)
def _exam_text_00(doc: Doc) -> str:
    s = "【問題】\n" + _q(doc) + "\n【選択肢】\n"
    for i, t in zip(_ids(doc), _texts(doc), strict=False):
        s += chr(i + 65) + ": " + t + "\n"
    return s + "\n【答え】\n"


def _text_01(doc: Doc) -> str:
    return f"[問題]:{_q(doc)}[選択肢]:[{', '.join(_texts(doc))}]\n[答え]:"


def _text_01_2(doc: Doc) -> str:
    labelled = [chr(i + 65) + ":" + t for i, t in zip(_ids(doc), _texts(doc), strict=False)]
    return f"[問題]:{_q(doc)}[選択肢]:[{', '.join(labelled)}]\n[答え]:"


def _text_02(doc: Doc) -> str:
    choices = ",".join(f"{i}.{t}" for i, t in zip(_ids(doc), _texts(doc), strict=False))
    return f"質問:{_q(doc)}選択肢:{choices}\n回答:"


def _dash(doc: Doc, sep: str = "\n") -> str:
    return sep.join(f"- {t}" for t in _texts(doc))


def _exam_text_02_1(doc: Doc) -> str:
    return f"質問:{_q(doc)}選択肢:\n{_dash(doc)}\n回答:"


def _exam_text_03(doc: Doc) -> str:
    return f"### 入力:\n{_q(doc)}出力は以下から選択してください：\n{_dash(doc)}\n\n### 応答:\n"


def _exam_text_04(doc: Doc, sep: str = "<NL>") -> str:
    inp = f"質問：{_q_joined(doc)}{sep}選択肢：{sep}{_dash(doc, sep)}"
    return f"ユーザー: {inp}{sep}システム: "


def _exam_text_05(doc: Doc) -> str:
    return _exam_text_04(doc, "\n")


def _exam_text_06(instruction: str) -> Callable[[Doc], str]:
    def f(doc: Doc) -> str:
        inp = f"質問：{_q_joined(doc)}出力は以下から選択してください：\n{_dash(doc)}"
        return f"{instruction}\n\n{inp} [/INST] "
    return f


# fp2's own doc_to_text functions
def _fp2_text_00(doc: Doc) -> str:
    return "【問題】\n" + _q(doc) + "\n【答え】\n"


def _fp2_text_02_1(doc: Doc) -> str:
    return f"質問:{_q(doc)}\n回答:"


def _fp2_text_03(doc: Doc) -> str:
    return f"### 入力:\n{_q(doc)}\n### 応答:\n"


def _fp2_text_04(doc: Doc, sep: str = "<NL>") -> str:
    return f"ユーザー: {_q_joined(doc)}{sep}システム: "


def _fp2_text_05(doc: Doc) -> str:
    return _fp2_text_04(doc, "\n")


def _fp2_text_06(doc: Doc) -> str:
    return f"{_BEST}\n\n質問：{_q_joined(doc)} [/INST] "


# chabsa: Jinja templates over sentence / target
def _jinja(template: str) -> Callable[[Doc], str]:
    def f(doc: Doc) -> str:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(doc[m.group(1)]), template)
    return f


_CHABSA_CHOICES = ["positive", "negative"]

# (description, doc_to_text template, target_delimiter) per chabsa version
_CHABSA: dict[str, tuple[str, str, str]] = {
    "default": ("以下のセンテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。\n\n\n",
                "センテンス: {{sentence}}\nターゲット: {{target}}\n回答:", " "),
    # The harness's 0.1 template really lacks the "[" before "ターゲット]".
    "0.1": ("[センテンス]における、[ターゲット]のセンチメントをpositiveかnegativeで選んでください。\n\n\n",
            "[センテンス]: {{sentence}}\nターゲット]: {{target}}\n[答え]:", " "),
    "0.2": ("センテンスとターゲットを入力として受け取り、ターゲットに関するセンチメントをpositiveかnegativeから選択してください。\n\n\n",
            "センテンス: {{sentence}}\nターゲット: {{target}}\n回答:", " "),
    "0.3": (_ALPACA + "以下のセンテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。\n\n\n",
            "### 入力:\nセンテンス:{{sentence}}\nターゲット:{{target}}\n\n### 応答:\n\n", ""),
    "0.4": ("ユーザー: センテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。<NL>システム: 分かりました。<NL>",
            "センテンス: {{sentence}}<NL>ターゲット: {{target}}<NL>システム:", " "),
    "0.5": ("ユーザー: センテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。\nシステム: 分かりました。\n\n",
            "センテンス: {{sentence}}\nターゲット: {{target}}\nシステム:", " "),
    "0.6": (_LLAMA2_SYS,
            "与えられたセンテンスにおける、ターゲットのセンチメントをpositiveかnegativeで答えてください。\n\n"
            "センテンス: {{sentence}}\nターゲット: {{target}} [/INST]", " "),
}
_CHABSA_ALIAS = {"0.1.2": "0.1", "0.2.1": "0.2"}

_Spec = tuple[str, Callable[[Doc], str], Callable[[Doc], list[str]], Callable[[Doc], str]]


def _exam_specs(desc_default: str, desc: dict[str, str], instruction_06: str) -> dict[str, _Spec]:
    alpha = (_alpha_choices, _alpha_target)
    text = (_text_choices, _text_target)
    return {
        "default": (desc_default, _exam_text_00, *alpha),
        "0.1": (desc["0.1"], _text_01, *text),
        "0.1.2": (desc["0.1.2"], _text_01_2, *alpha),
        "0.2": (desc["0.2"], _text_02, _num_choices, _num_target),
        "0.2.1": (desc["0.2.1"], _exam_text_02_1, *text),
        "0.3": (desc["0.3"], _exam_text_03, *text),
        "0.4": (desc["0.4"], _exam_text_04, *text),
        "0.5": (desc["0.5"], _exam_text_05, *text),
        "0.6": (_LLAMA2_SYS, _exam_text_06(instruction_06), *text),
    }


def _plain_desc(best: str) -> dict[str, str]:
    return {
        "0.2.1": f"{best}\n\n\n",
        "0.3": f"{_ALPACA}{best}\n\n\n",
        "0.4": f"ユーザー: {best}<NL>システム: 分かりました。<NL>",
        "0.5": f"ユーザー: {best}\nシステム: 分かりました。\n\n",
    }


_NUM_DESC = "質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。なお、回答は選択肢の番号(例:0)でするものとします。\n\n\n"
_CMA_DESC = {"0.1": "[問題]に対する[答え]を[選択肢]の中から選んでください。\n\n\n",
             "0.1.2": "[問題]に対する[答え]を[選択肢]の中からアルファベットで選んでください。\n\n\n",
             "0.2": _NUM_DESC, **_plain_desc(_BEST)}
_CPA_DESC = {"0.1": "[問題]に対する[答え]をとして適切な記号の組み合わせを[選択肢]の中から選んでください。\n\n\n",
             "0.1.2": "[問題]に対する[答え]として適切な記号の組み合わせを[選択肢]の中からアルファベットで選んでください。\n\n\n",
             "0.2": "質問とその答えとして適切な記号の組み合わせの選択肢を入力として受け取り、選択肢から回答を選択してください。"
                    "なお、回答は選択肢の番号(例:0)でするものとします。\n\n\n",
             **_plain_desc(_BEST_CPA)}
_ALPHA_DEFAULT = "以下の問題の適切な答えを選択肢から選んでアルファベットで答えなさい。\n\n\n"

_SPECS: dict[str, dict[str, _Spec]] = {
    "cma_basics": _exam_specs(_ALPHA_DEFAULT, _CMA_DESC, _BEST),
    "security_sales_1": _exam_specs(_ALPHA_DEFAULT, _CMA_DESC, _BEST),
    "cpa_audit": _exam_specs("以下の問題の答えとして適切な記号の組み合わせを選択肢から選んでアルファベットで答えなさい。\n\n\n",
                             _CPA_DESC, _BEST_CPA),
    "fp2": {
        "default": ("以下の問題の適切な答えを選択肢から選んで１～４の数字で答えなさい。\n\n\n", _fp2_text_00,
                    _text_choices, _fp2_text_target),
        "0.1": (_CMA_DESC["0.1"], _text_01, _text_choices, _fp2_text_target),
        "0.1.2": (_CMA_DESC["0.1.2"], _text_01_2, _fp2_alpha_choices, _fp2_alpha_target),
        "0.2": (_NUM_DESC, _text_02, _num_choices, _num_target),
        "0.2.1": (_CMA_DESC["0.2.1"], _fp2_text_02_1, _text_choices, _fp2_text_target),
        "0.3": (_CMA_DESC["0.3"], _fp2_text_03, _text_choices, _fp2_text_target),
        "0.4": (_CMA_DESC["0.4"], _fp2_text_04, _text_choices, _fp2_text_target),
        "0.5": (_CMA_DESC["0.5"], _fp2_text_05, _text_choices, _fp2_text_target),
        "0.6": (_LLAMA2_SYS, _fp2_text_06, _text_choices, _fp2_text_target),
    },
}


def get_prompt(task: str, version: str = "default") -> Prompt:
    if task not in TASKS:
        raise DataError(f"unknown jfin task {task!r}; known: {', '.join(TASKS)}")
    if version not in VERSIONS:
        raise DataError(f"unknown prompt version {version!r} for {task}; known: {', '.join(VERSIONS)}")
    if task == "chabsa":
        rv = _CHABSA_ALIAS.get(version, version)
        desc, tmpl, delim = _CHABSA[rv]
        return Prompt(task, version, rv, desc, _jinja(tmpl), lambda d: list(_CHABSA_CHOICES),
                      _jinja("{{polarity}}"), delim)
    desc, text_fn, choice_fn, target_fn = _SPECS[task][version]
    return Prompt(task, version, version, desc, text_fn, choice_fn, target_fn, "")


# -- data ------------------------------------------------------------------------------------------

_JSON_FILES = {
    "cma_basics": ("cma_basics.json", "jlm_fin_eval/datasets/cma_basics/data.json"),
    "fp2": ("fp2.json", "jlm_fin_eval/datasets/fp2/data.json"),
    "security_sales_1": ("security_sales_1.json", "jlm_fin_eval/datasets/security_sales_1/data.json"),
}
_CPA_FILES = ("cpa_audit.xlsx", "jlm_fin_eval/datasets/cpa/CPA_AUDIT.xlsx")


def _first_existing(base: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (base / n).is_file():
            return base / n
    return None


CHABSA_KAGGLE = "https://www.kaggle.com/datasets/takahirokubo0/chabsa"
_CHABSA_DIRS = ("chABSA-dataset", "chabsa/chABSA-dataset", "chabsa", "jlm_fin_eval/datasets/chabsa/chABSA-dataset")


def _chabsa_zips(data_dir: Path) -> list[Path]:
    return [p for p in [data_dir / "chabsa.zip", *sorted((data_dir / "chabsa").glob("*.zip"))] if p.is_file()]


def data_files(task: str, data_dir: Path) -> list[Path]:
    """The files a task reads from `data_dir` (empty when absent)."""
    data_dir = Path(data_dir)
    if task in _JSON_FILES:
        p = _first_existing(data_dir, _JSON_FILES[task])
        return [p] if p else []
    if task == "cpa_audit":
        p = _first_existing(data_dir, _CPA_FILES)
        return [p] if p else []
    for sub in _CHABSA_DIRS:
        files = sorted(f for f in (data_dir / sub).glob("*.json") if f.is_file())
        if files:
            return files
    return _chabsa_zips(data_dir)[:1]


def load_docs(task: str, data_dir: str | Path) -> list[Doc]:
    """The task's documents in the harness's order."""
    files = data_files(task, Path(data_dir))
    if not files:
        raise TaskDataMissing(f"{task}: no data files under {data_dir}; " + _expected(task, Path(data_dir)))
    if task in _JSON_FILES:
        return _load_exam_json(files[0])
    if task == "cpa_audit":
        return _load_cpa(files[0])
    if files[0].suffix == ".zip":
        return _load_chabsa_zip(files[0])
    return _load_chabsa([(str(f), f.read_bytes()) for f in files])


def _expected(task: str, data_dir: Path) -> str:
    if task in _JSON_FILES:
        return "expected " + " or ".join(_JSON_FILES[task]) + " (a harness checkout or the flat copy)"
    if task == "cpa_audit":
        return "expected " + " or ".join(_CPA_FILES) + " (a harness checkout or the flat copy)"
    return (f"the harness reads the Kaggle dataset takahirokubo0/chabsa ({CHABSA_KAGGLE}; "
            f"`kaggle datasets download takahirokubo0/chabsa`): put its chabsa.zip into {data_dir}, "
            f"or unpack it there so that {data_dir / 'chABSA-dataset'}/*.json exist")


def _load_exam_json(path: Path) -> list[Doc]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["data"]
        return [{"id": r["id"], "question": r["question"], "context": r.get("context") or "",
                 "choices": {"id": [c["id"] for c in r["choices"]], "text": [c["text"] for c in r["choices"]]},
                 "answer": r["answer"]} for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a harness data file ({type(e).__name__}: {e})") from None


def _cell_str(v: Any) -> str:
    """pandas' astype(str) of a cell read by read_excel (integral floats are read as ints)."""
    if v is None:
        return "nan"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _answer(v: Any, path: Path) -> int:
    if not isinstance(v, (int, float)):
        raise DataError(f"{path}: a_no {v!r} is not a number")
    return int(v) - 1


def _load_cpa(path: Path) -> list[Doc]:
    import openpyxl

    try:
        wb = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises many kinds
        raise DataError(f"{path}: cannot read the workbook: {e}") from None
    ws = wb.worksheets[0]
    rows = ws.iter_rows(values_only=True)
    header = [(_cell_str(h) if h is not None else "") for h in next(rows)]
    col = {h: i for i, h in enumerate(header)}
    for need in ("question", "a_no", "abnormal_flg", "1", "6"):
        if need not in col:
            raise DataError(f"{path}: column {need!r} missing from the header row")
    docs: list[Doc] = []
    for row in rows:
        cells = {h: row[i] if i < len(row) else None for h, i in col.items()}
        q = _cell_str(cells["question"])
        if q in ("", "nan"):
            continue
        if cells["abnormal_flg"] == 1:
            continue
        ctx = []
        for k in ("ア", "イ", "ウ", "エ", "オ", "カ"):
            v = _cell_str(cells.get(k))
            if v not in ("", "nan"):
                ctx.append(f"{k}: {v}")
        # datasets casts pandas' NaN of an empty choice cell to the string "nan"
        texts = [_cell_str(cells[str(i + 1)]) for i in range(6)]
        docs.append({"id": len(docs), "question": q, "context": "\n".join(ctx),
                     "choices": {"id": list(range(6)), "text": texts}, "answer": _answer(cells["a_no"], path)})
    wb.close()
    return docs


def _chabsa_members(names: list[str]) -> list[str]:
    """Zip members the harness's glob ``<root>/chABSA-dataset/*.json`` sees, in name order."""
    out = []
    for m in names:
        parts = m.split("/")
        if len(parts) >= 2 and parts[-2] == "chABSA-dataset" and parts[-1].endswith(".json"):
            out.append(m)
    return sorted(out)


def _load_chabsa_zip(path: Path) -> list[Doc]:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            members = _chabsa_members(z.namelist())
            if not members:
                raise TaskDataMissing(f"chabsa: {path} has no chABSA-dataset/*.json; "
                                      f"use the zip of the Kaggle dataset {CHABSA_KAGGLE}")
            return _load_chabsa([(f"{path}:{m}", z.read(m)) for m in members])
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not a zip file ({e}); use the zip of the Kaggle dataset {CHABSA_KAGGLE}") from None


def _load_chabsa(files: list[tuple[str, bytes]]) -> list[Doc]:
    """One document per opinion of every sentence, numbered in file then sentence order."""
    docs: list[Doc] = []
    for name, blob in files:
        try:
            data = json.loads(blob.decode("utf-8"))
            for row in data["sentences"]:
                for op in row["opinions"]:
                    docs.append({"id": len(docs), "sentence": row["sentence"], "target": op["target"],
                                 "polarity": op["polarity"]})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{name}: not a chABSA annotation file ({type(e).__name__}: {e})") from None
    return docs


# -- leaderboard -----------------------------------------------------------------------------------

def leaderboard(scores: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """The harness's leaderboard rule (``developments/make_leaderboard.py``) over prompt versions.

    `scores[version][task]` is the task's metric (f1 for chabsa, acc otherwise), None when its data
    is missing. Per version, the average of 100 × metric over the tasks that score above zero (a
    task scoring exactly 0 is left out of the average, as the harness does; a missing task has no
    result at all); a version where no task scores is averaged 0. The best version is the first (in
    the order of `scores`) whose average is strictly higher than every earlier one and than 0; a
    model without one has no best version and no average.

    Per version: ``average`` (as above; None when no task has data), ``complete`` (every task has
    data), ``missing`` (tasks without data), ``left_out`` (tasks scoring exactly 0), ``tasks`` (100 ×
    metric)."""
    per_version: dict[str, dict[str, Any]] = {}
    best: str | None = None
    best_avg = 0.0
    for version, by_task in scores.items():
        present = {t: 100.0 * v for t, v in by_task.items() if v is not None}
        counted = [v for v in present.values() if v]
        avg = (sum(counted) / len(counted) if counted else 0.0) if present else None
        per_version[version] = {"average": avg, "complete": all(t in present for t in TASKS),
                                "missing": [t for t in TASKS if t not in present],
                                "left_out": [t for t, v in present.items() if not v],
                                "tasks": {t: (100.0 * v if v is not None else None) for t, v in by_task.items()}}
        if avg is not None and avg > best_avg:
            best, best_avg = version, avg
    return {"best_version": best, "versions": per_version,
            "average": per_version[best]["average"] if best else None}


# -- download (when online) -------------------------------------------------------------------------

PINNED_COMMIT = "aeff729"  # pfnet-research/japanese-lm-fin-harness, 2025-11-27
RAW_URL = "https://raw.githubusercontent.com/pfnet-research/japanese-lm-fin-harness/{commit}/{path}"
# chakki-works' own release of chABSA (the harness reads the Kaggle upload of it, which needs a Kaggle
# login to download: put that zip into data_dir to use exactly the harness's files).
CHABSA_URL = "https://s3-ap-northeast-1.amazonaws.com/dev.tech-sketch.jp/chakki/public/chABSA-dataset.zip"
# flat name -> (path in the harness, sha256 of the file at PINNED_COMMIT)
PINNED_FILES: dict[str, tuple[str, str]] = {
    "cma_basics.json": ("jlm_fin_eval/datasets/cma_basics/data.json",
                        "403c593c97f4fc22d62fa5517a97f04be5d87fbe54d4d8a6104c7bafc8ff1582"),
    "fp2.json": ("jlm_fin_eval/datasets/fp2/data.json",
                 "94bf768adc84835243c74a8da917675a75fb029524d2ed32ebb1707e8c50d643"),
    "security_sales_1.json": ("jlm_fin_eval/datasets/security_sales_1/data.json",
                              "e9712b7fc1f4f4d41f804a64b1fb6966b4a4351b3cf6d25c37424f89eb4b0d45"),
    "cpa_audit.xlsx": ("jlm_fin_eval/datasets/cpa/CPA_AUDIT.xlsx",
                       "4bef450cf9d2b28670089bb43d6f2d14bf1900557c2c6946ac5e4d83995a5db0"),
}


def _urllib_fetch(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (fixed https URLs)
        return bytes(r.read())


def download_data(cache_dir: str | Path, *, fetch: Callable[[str], bytes] | None = None,
                  chabsa: bool = True) -> Path:
    """Download the task data once at the pinned commit into `<cache_dir>/jfin-<commit>/` (flat layout),
    verifying each file's sha256; chABSA's zip (`CHABSA_URL`) has its ``chABSA-dataset/*.json`` unpacked
    to `chABSA-dataset/` (its sha256 is recorded in `chabsa.sha256` on first download and checked on
    later ones). Returns the data directory."""
    import hashlib
    import io
    import zipfile

    from finrecipe.errors import IoError
    from finrecipe.util.fs import atomic_dir

    fetch = fetch or _urllib_fetch
    dest = Path(cache_dir) / f"jfin-{PINNED_COMMIT}"
    if all((dest / n).is_file() for n in PINNED_FILES) and (not chabsa or (dest / "chABSA-dataset").is_dir()):
        return dest
    with atomic_dir(dest, overwrite=True) as tmp:
        for name, (path, sha) in PINNED_FILES.items():
            url = RAW_URL.format(commit=PINNED_COMMIT, path=path)
            try:
                data = fetch(url)
            except OSError as e:
                raise IoError(f"cannot download {url}: {e}; pass --data-dir with a local copy instead") from None
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise DataError(f"{url}: sha256 {got} does not match the pinned {sha}; refusing the file")
            (tmp / name).write_bytes(data)
        if chabsa:
            try:
                blob = fetch(CHABSA_URL)
            except OSError as e:
                raise IoError(f"cannot download {CHABSA_URL}: {e}; put the Kaggle dataset's chabsa.zip "
                              f"({CHABSA_KAGGLE}) into a data directory and pass that instead") from None
            old = dest / "chabsa.sha256"
            got = hashlib.sha256(blob).hexdigest()
            if old.is_file() and old.read_text().strip() != got:
                raise DataError(f"{CHABSA_URL}: sha256 {got} differs from the recorded {old.read_text().strip()}")
            with zipfile.ZipFile(io.BytesIO(blob)) as z:
                for member in _chabsa_members(z.namelist()):
                    (tmp / "chABSA-dataset").mkdir(exist_ok=True)
                    (tmp / "chABSA-dataset" / Path(member).name).write_bytes(z.read(member))
            (tmp / "chabsa.sha256").write_text(got + "\n")
    return dest
