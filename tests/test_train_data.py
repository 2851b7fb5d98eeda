"""Training data: reading errors with file and line, tokenized-shard cache, mixing, splitting,
finetune masking, LR schedules. No model training here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from finrecipe.errors import ConfigError, DataError
from finrecipe.train.data import (
    SequenceSet,
    build_order,
    split_heldout,
    tokenize_instructions,
    tokenize_pretraining,
)
from finrecipe.train.schedule import ScheduleConfig, lr_factor
from finrecipe.types import DatasetRef


@pytest.fixture(scope="module")
def tok(tiny_model: Callable[..., Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama"))


def _jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _ref(path: Path, fmt: str = "jsonl", **kw) -> DatasetRef:
    return DatasetRef(name=path.stem, files=(path,), format=fmt, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- bad datasets
def test_missing_field_names_file_and_line(tmp_path: Path, tok) -> None:
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "w3 w4"}, {"text": "w5"}, {"body": "w6"}])
    with pytest.raises(DataError) as e:
        tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    msg = str(e.value)
    assert f"{p}:3:" in msg and "missing field 'text'" in msg and "body" in msg


def test_empty_file(tmp_path: Path, tok) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        tokenize_pretraining(_ref(p), tok, tmp_path / "cache")


def test_non_utf8_line(tmp_path: Path, tok) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "w3"}\n{"text": "w4"}\n{"text": "w\xff5"}\n')
    with pytest.raises(DataError) as e:
        tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    assert f"{p}:3: not valid UTF-8" in str(e.value)
    t = tmp_path / "bad.txt"
    t.write_bytes(b"w3 w4\nw5\n\xc3(\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not valid UTF-8"):
        tokenize_pretraining(_ref(t, "text"), tok, tmp_path / "cache")


def test_invalid_json_and_non_object(tmp_path: Path, tok) -> None:
    p = tmp_path / "j.jsonl"
    p.write_text('{"text": "w3"}\n{"text": "w4"\n')
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON"):
        tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    q = tmp_path / "k.jsonl"
    q.write_text('{"text": "w3"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"k\.jsonl:2: expected a JSON object"):
        tokenize_pretraining(_ref(q), tok, tmp_path / "cache")


def test_finetune_missing_response_field(tmp_path: Path, tok) -> None:
    p = _jsonl(tmp_path / "ft.jsonl", [{"prompt": "w3", "response": "w4"}, {"prompt": "w5", "answer": "w6"}])
    with pytest.raises(DataError, match=r"ft\.jsonl:2: missing field 'response'"):
        tokenize_instructions(_ref(p), tok, tmp_path / "c", template="Q {prompt} A", prompt_field="prompt",
                              response_field="response", seq_len=16, packing=True)


# ----------------------------------------------------------------------------- tokenizing
def test_pretraining_tokens_eos_and_cache(tmp_path: Path, tok) -> None:
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "w3 w4 w5"}, {"text": "w6"}])
    sh = tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    eos = tok.eos_token_id
    assert list(sh.tokens()) == [3, 4, 5, eos, 6, eos]
    assert json.loads((sh.dir / "index.json").read_text())["n_docs"] == 2
    # Reused from the cache: same directory, and the file is not rewritten.
    mtime = (sh.dir / "tokens.bin").stat().st_mtime_ns
    again = tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    assert again.dir == sh.dir and (sh.dir / "tokens.bin").stat().st_mtime_ns == mtime
    # Different data → a different key.
    _jsonl(p, [{"text": "w3 w4"}])
    other = tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    assert other.dir != sh.dir and list(other.tokens()) == [3, 4, eos]


@pytest.mark.parametrize("damage", ["truncate", "flip", "index"])
def test_damaged_token_cache_is_rebuilt(tmp_path: Path, tok, damage: str) -> None:
    """A cut-short tokens.bin (or changed bytes, or a broken index) is detected and rebuilt, not
    memory-mapped past its end forever."""
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "w3 w4 w5 w6 w7"}, {"text": "w8 w9"}])
    sh = tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    want = list(sh.tokens())
    f = sh.dir / "tokens.bin"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-6])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[0] ^= 1
        f.write_bytes(bytes(b))
    else:
        (sh.dir / "index.json").write_text('{"n_tokens": ')
    again = tokenize_pretraining(_ref(p), tok, tmp_path / "cache")
    assert again.dir == sh.dir and list(again.tokens()) == want
    assert "sha256" in json.loads((sh.dir / "index.json").read_text())


def test_finetune_masks_prompt(tmp_path: Path, tok) -> None:
    p = _jsonl(tmp_path / "ft.jsonl", [{"prompt": "w10 w11", "response": "w20 w21 w22"},
                                       {"prompt": "w12", "response": "w23"}])
    eos = tok.eos_token_id
    sh = tokenize_instructions(_ref(p), tok, tmp_path / "c", template="w5 {prompt} w6",
                               prompt_field="prompt", response_field="response", seq_len=8, packing=False)
    toks, mask = np.asarray(sh.tokens()).reshape(-1, 8), np.asarray(sh.mask()).reshape(-1, 8)
    assert toks[0].tolist() == [5, 10, 11, 6, 20, 21, 22, eos]
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert toks[1].tolist() == [5, 12, 6, 23, eos, eos, eos, eos]
    assert mask[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    # The trainer's labels: next-token targets, -100 where the mask is 0.
    from finrecipe.train.trainer import _make_batch

    x, y, pos = _make_batch(SequenceSet([sh], 8), np.array([0, 1]))
    assert pos is None
    assert x[0].tolist() == toks[0].tolist()
    assert y[0].tolist() == [-100, -100, -100, 20, 21, 22, eos, -100]
    assert y[1].tolist() == [-100, -100, 23, eos, -100, -100, -100, -100]
    packed = tokenize_instructions(_ref(p), tok, tmp_path / "c", template="w5 {prompt} w6",
                                   prompt_field="prompt", response_field="response", seq_len=8, packing=True)
    assert list(packed.tokens()) == [5, 10, 11, 6, 20, 21, 22, eos, 5, 12, 6, 23, eos]
    assert list(packed.mask()) == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1]
    with pytest.raises(ConfigError, match="must contain"):
        tokenize_instructions(_ref(p), tok, tmp_path / "c", template="no placeholder", prompt_field="prompt",
                              response_field="response", seq_len=8, packing=True)


# ------------------------------------------------------------------------- mixing and splits
def test_build_order_deterministic_weighted_and_budgeted() -> None:
    ids = [np.arange(100), np.arange(10)]
    offsets = [0, 100, 110]
    a = build_order(ids, offsets, [1.0, 1.0], seed=3, epochs=1, total_sequences=None)
    b = build_order(ids, offsets, [1.0, 1.0], seed=3, epochs=1, total_sequences=None)
    c = build_order(ids, offsets, [1.0, 1.0], seed=4, epochs=1, total_sequences=None)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(110))  # one epoch: every sequence exactly once
    w = build_order(ids, offsets, [0.5, 3.0], seed=0, epochs=2, total_sequences=None)
    assert (w < 100).sum() == 100 and (w >= 100).sum() == 60
    # The small dataset is repeated whole before any sequence is seen a third time.
    counts = np.bincount(w[w >= 100] - 100)
    assert counts.min() == counts.max() == 6
    budget = build_order(ids, offsets, [1.0, 1.0], seed=0, epochs=None, total_sequences=55)
    assert len(budget) == 55 and (budget < 100).sum() == 50


def test_split_heldout_disjoint_and_seeded() -> None:
    tr, va = split_heldout([50, 7], 0.1, seed=1)
    assert [len(v) for v in va] == [5, 1]
    for t, v, n in zip(tr, va, [50, 7], strict=True):
        assert set(t.tolist()) | set(v.tolist()) == set(range(n)) and not set(t.tolist()) & set(v.tolist())
    tr2, va2 = split_heldout([50, 7], 0.1, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(va, va2, strict=True))


# ------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_schedules(kind: str) -> None:
    cfg = ScheduleConfig(kind=kind, warmup_steps=4, min_lr_ratio=0.1, decay_ratio=0.25)  # type: ignore[arg-type]
    f = [lr_factor(cfg, s, 100) for s in range(100)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and f[4] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(f[4:], f[5:], strict=False))  # no increase after warmup
    if kind == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] == pytest.approx(0.1)
    if kind == "wsd":
        assert f[74] == 1.0 and f[76] < 1.0
    if kind == "cosine":
        assert f[52] == pytest.approx(0.55, abs=0.01)  # half-way between warmup end and the last step
    with pytest.raises(ConfigError):
        lr_factor(ScheduleConfig(warmup_steps=1, warmup_ratio=0.1), 0, 10)
