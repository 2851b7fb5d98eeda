"""Training data: read documents, tokenize, pack into uint32 memmap shards, mix, split.

Layout of one tokenized dataset in the cache (``<cache_dir>/tokens/<key>/``)::

    tokens.bin   uint32, all documents concatenated (BOS as the tokenizer adds it, EOS after each)
    mask.bin     uint8, 1 where the token is a training target (finetune data only)
    index.json   {"n_tokens", "n_docs", "seq_len" (finetune only), "tokenizer", "files", ...}

The key hashes the tokenizer (its serialized JSON and special tokens), the data files' sha256 and
the reading options, so reruns and other stages reuse the same shards. Continual-pretraining tokens
do not depend on the sequence length: sequences are cut from the stream at training time.

Mixing (``build_order``): dataset *i* with ``n_i`` training sequences and weight ``w_i`` contributes
``round(w_i * n_i)`` sequences per epoch (weight 1 = natural size, 0.5 = half, 2 = twice); with a
token budget the counts are scaled to the budget in the same proportions. Each dataset's sequences
are drawn from seeded permutations (a fresh permutation each time one runs out), and the whole
epoch is shuffled with the seed. The result is one int64 array of global sequence ids: the
training order; a position in it is the data position saved in checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finrecipe.errors import ConfigError, DataError
from finrecipe.progress import NullProgress, Progress
from finrecipe.types import DatasetRef
from finrecipe.util.fs import atomic_dir, write_json_atomic

log = logging.getLogger("finrecipe.train")

DATA_VERSION = "1"
TOKENIZE_BATCH = 512


# --------------------------------------------------------------------------------------- reading
def _decode(raw: bytes, file: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{file}:{line}: not valid UTF-8 (byte {e.start}: {e.reason}); re-encode the file as UTF-8"
        ) from None


def iter_records(ref: DatasetRef) -> Iterator[tuple[Path, int, dict[str, Any] | str]]:
    """Yield (file, line-or-row, record) for every record of a dataset. Text files: one record
    per file (the whole file). Raises DataError naming file and line for unusable input."""
    if not ref.files:
        raise DataError(f"dataset {ref.name!r}: no files")
    for file in ref.files:
        if not file.is_file():
            raise DataError(f"dataset {ref.name!r}: {file}: file not found")
        count = 0
        if ref.format == "jsonl":
            with open(file, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    text = _decode(raw, file, lineno)
                    try:
                        rec = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{file}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                        "each line must be one JSON object") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{file}:{lineno}: expected a JSON object, got "
                                        f"{type(rec).__name__}")
                    count += 1
                    yield file, lineno, rec
        elif ref.format == "text":
            data = file.read_bytes()
            for lineno, raw in enumerate(data.split(b"\n"), 1):
                _decode(raw, file, lineno)
            text = data.decode("utf-8")
            if text.strip():
                count += 1
                yield file, 1, text
        elif ref.format == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{file}: reading parquet needs pyarrow; install it with "
                                "`pip install pyarrow` or convert the data to jsonl") from None
            table = pq.read_table(file)
            for row, rec in enumerate(table.to_pylist(), 1):
                count += 1
                yield file, row, rec
        else:  # pragma: no cover - DatasetRef's Literal prevents it
            raise ConfigError(f"dataset {ref.name!r}: unknown format {ref.format!r}")
        if count == 0:
            raise DataError(f"{file}: empty file (no documents); remove it from dataset {ref.name!r} "
                            "or add data")


def _field(rec: dict[str, Any] | str, name: str, file: Path, line: int) -> str:
    if isinstance(rec, str):
        return rec
    if name not in rec:
        keys = ", ".join(sorted(map(str, rec))) or "none"
        raise DataError(f"{file}:{line}: missing field {name!r} (fields present: {keys}); "
                        "set the dataset's text_field / the stage's field option to one of them")
    val = rec[name]
    if not isinstance(val, str):
        raise DataError(f"{file}:{line}: field {name!r} must be a string, got {type(val).__name__}")
    return val


# ------------------------------------------------------------------------------------ tokenizing
def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: a fast tokenizer "
                          "(tokenizer.json) is required for training")
    h.update(backend.to_str().encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(ref: DatasetRef) -> list[str]:
    if ref.sha256 and len(ref.sha256) == len(ref.files):
        return list(ref.sha256)
    return [_file_sha256(f) for f in ref.files]


@dataclass(frozen=True)
class TokenShard:
    """One tokenized dataset: a token stream (and optional loss mask) on disk."""

    name: str
    dir: Path
    n_tokens: int
    weight: float = 1.0
    seq_len: int | None = None  # fixed rows (finetune data); None: cut at training time
    has_mask: bool = False

    def tokens(self) -> np.memmap:
        return np.memmap(self.dir / "tokens.bin", dtype=np.uint32, mode="r", shape=(self.n_tokens,))

    def mask(self) -> np.memmap | None:
        if not self.has_mask:
            return None
        return np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r", shape=(self.n_tokens,))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dir": str(self.dir), "n_tokens": self.n_tokens, "weight": self.weight,
                "seq_len": self.seq_len, "has_mask": self.has_mask}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenShard:
        return cls(name=d["name"], dir=Path(d["dir"]), n_tokens=int(d["n_tokens"]),
                   weight=float(d["weight"]), seq_len=d.get("seq_len"), has_mask=bool(d["has_mask"]))


def _load_shard(d: Path, name: str, weight: float) -> TokenShard | None:
    """The cached shard in ``d`` when its index and files check out (sizes and sha256 as recorded
    in index.json); None when it is missing or damaged (it is then rebuilt)."""
    idx = d / "index.json"
    if not d.is_dir():
        return None
    try:
        meta = json.loads(idx.read_text())
        n = int(meta["n_tokens"])
        has_mask = bool(meta.get("has_mask", False))
        want = {"tokens.bin": 4 * n, **({"mask.bin": n} if has_mask else {})}
        for fname, size in want.items():
            f = d / fname
            if f.stat().st_size != size:
                raise ValueError(f"{fname} has {f.stat().st_size} bytes, the index says {size}")
            digest = (meta.get("sha256") or {}).get(fname)
            if digest is None:
                raise ValueError(f"index.json has no sha256 of {fname}")
            if _file_sha256(f) != digest:
                raise ValueError(f"{fname} does not match its sha256 in index.json")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: token cache is damaged (%s); tokenizing %s again", d, e, name)
        return None
    return TokenShard(name=name, dir=d, n_tokens=n, weight=weight,
                      seq_len=meta.get("seq_len"), has_mask=has_mask)


def _encode_batch(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    # A fast tokenizer encodes a batch on all cores (Rust, rayon).
    out = tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
    return [list(x) for x in out]


def tokenize_pretraining(ref: DatasetRef, tokenizer: Any, cache_dir: Path,
                         progress: Progress | None = None, weight: float | None = None) -> TokenShard:
    """Tokenize a text dataset (EOS after every document) into the cache, or reuse it."""
    progress = progress or NullProgress()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token")
    key_src = {"v": DATA_VERSION, "kind": "pretrain", "tok": tokenizer_fingerprint(tokenizer),
               "data": dataset_fingerprint(ref), "format": ref.format, "field": ref.text_field}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    dest = cache_dir / "tokens" / key
    w = ref.weight if weight is None else weight
    hit = _load_shard(dest, ref.name, w)
    if hit is not None:
        return hit
    n_tokens = n_docs = 0
    with atomic_dir(dest, overwrite=True) as tmp, open(tmp / "tokens.bin", "wb") as out, \
            progress.task(f"tokenize {ref.name}", total=None, unit="doc") as task:
        batch: list[str] = []

        def flush() -> None:
            nonlocal n_tokens, n_docs
            ids = _encode_batch(tokenizer, batch, True)
            flat: list[int] = []
            for x in ids:
                flat.extend(x)
                if not x or x[-1] != eos:
                    flat.append(eos)
            np.asarray(flat, dtype=np.uint32).tofile(out)
            n_tokens += len(flat)
            n_docs += len(batch)
            task.update(advance=len(batch))
            batch.clear()

        for file, line, rec in iter_records(ref):
            batch.append(_field(rec, ref.text_field, file, line))
            if len(batch) >= TOKENIZE_BATCH:
                flush()
        if batch:
            flush()
        out.flush()
        os.fsync(out.fileno())
        write_json_atomic(tmp / "index.json", {
            **key_src, "n_tokens": n_tokens, "n_docs": n_docs, "has_mask": False,
            "sha256": {"tokens.bin": _file_sha256(tmp / "tokens.bin")},
            "files": [str(f) for f in ref.files]}, indent=1)
    return TokenShard(name=ref.name, dir=dest, n_tokens=n_tokens, weight=w)


def tokenize_instructions(ref: DatasetRef, tokenizer: Any, cache_dir: Path, *, template: str,
                          prompt_field: str, response_field: str, seq_len: int, packing: bool,
                          progress: Progress | None = None, weight: float | None = None) -> TokenShard:
    """Tokenize prompt/response pairs: template(prompt) masked out, response + EOS as targets.

    Packed: examples are concatenated and cut into rows of ``seq_len``; padded: one example per row
    (truncated to ``seq_len``), padded with EOS that is masked out."""
    progress = progress or NullProgress()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token")
    if "{prompt}" not in template:
        raise ConfigError(f"template {template!r} must contain '{{prompt}}'")
    key_src = {"v": DATA_VERSION, "kind": "instruct", "tok": tokenizer_fingerprint(tokenizer),
               "data": dataset_fingerprint(ref), "format": ref.format, "template": template,
               "prompt_field": prompt_field, "response_field": response_field, "seq_len": seq_len,
               "packing": packing}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    dest = cache_dir / "tokens" / key
    w = ref.weight if weight is None else weight
    hit = _load_shard(dest, ref.name, w)
    if hit is not None:
        return hit
    tokens: list[int] = []
    mask: list[int] = []
    n_docs = 0
    with progress.task(f"tokenize {ref.name}", total=None, unit="example") as task:
        recs = [(_field(r, prompt_field, f, ln), _field(r, response_field, f, ln))
                for f, ln, r in iter_records(ref)]
        for start in range(0, len(recs), TOKENIZE_BATCH):
            chunk = recs[start:start + TOKENIZE_BATCH]
            p_ids = _encode_batch(tokenizer, [template.replace("{prompt}", p) for p, _ in chunk], True)
            r_ids = _encode_batch(tokenizer, [r for _, r in chunk], False)
            for p, r in zip(p_ids, r_ids, strict=True):
                ex = p + r + [eos]
                m = [0] * len(p) + [1] * (len(r) + 1)
                if not packing:
                    ex, m = ex[:seq_len], m[:seq_len]
                    pad = seq_len - len(ex)
                    ex, m = ex + [eos] * pad, m + [0] * pad
                tokens.extend(ex)
                mask.extend(m)
            n_docs += len(chunk)
            task.update(advance=len(chunk))
    with atomic_dir(dest, overwrite=True) as tmp:
        np.asarray(tokens, dtype=np.uint32).tofile(tmp / "tokens.bin")
        np.asarray(mask, dtype=np.uint8).tofile(tmp / "mask.bin")
        write_json_atomic(tmp / "index.json", {
            **key_src, "n_tokens": len(tokens), "n_docs": n_docs, "has_mask": True,
            "sha256": {f: _file_sha256(tmp / f) for f in ("tokens.bin", "mask.bin")},
            "files": [str(f) for f in ref.files]}, indent=1)
    return TokenShard(name=ref.name, dir=dest, n_tokens=len(tokens), weight=w, seq_len=seq_len,
                      has_mask=True)


# ------------------------------------------------------------------------ sequences, mix, split
class SequenceSet:
    """Fixed-length sequences cut from several token shards, addressed by one global id."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int) -> None:
        self.shards = list(shards)
        self.seq_len = seq_len
        self._tokens = [s.tokens() for s in self.shards]
        self._masks = [s.mask() for s in self.shards]
        self.counts = [s.n_tokens // seq_len for s in self.shards]
        self.offsets = np.cumsum([0, *self.counts])
        for s, c in zip(self.shards, self.counts, strict=True):
            if c == 0:
                raise DataError(f"dataset {s.name!r} has {s.n_tokens} tokens, fewer than one sequence "
                                f"of seq_len={seq_len}; add data or lower seq_len")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, gid: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens (int64, seq_len) and loss mask (uint8 or None) of a global sequence id."""
        i = int(np.searchsorted(self.offsets, gid, side="right") - 1)
        j = gid - int(self.offsets[i])
        a, b = j * self.seq_len, (j + 1) * self.seq_len
        m = self._masks[i]
        return np.asarray(self._tokens[i][a:b], dtype=np.int64), (None if m is None else np.asarray(m[a:b]))


def split_heldout(counts: Sequence[int], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per dataset: (train local ids, held-out local ids); held-out is a seeded random ``fraction``."""
    train, val = [], []
    for i, n in enumerate(counts):
        k = int(math.floor(n * fraction))
        if fraction > 0 and k == 0 and n > 1:
            k = 1
        perm = np.random.default_rng([seed, 7919, i]).permutation(n)
        val.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return train, val


def build_order(train_ids: Sequence[np.ndarray], offsets: Sequence[int] | np.ndarray, weights: Sequence[float],
                seed: int, *, epochs: float | None, total_sequences: int | None) -> np.ndarray:
    """The deterministic training order (global sequence ids). See the module docstring."""
    base = np.array([w * len(ids) for w, ids in zip(weights, train_ids, strict=True)], dtype=np.float64)
    if base.sum() <= 0:
        raise DataError("no training sequences: every dataset is empty or has weight 0")
    if total_sequences is not None:
        want = base / base.sum() * total_sequences
    else:
        want = base * (1.0 if epochs is None else epochs)
    counts = np.floor(want).astype(np.int64)
    # Hand out what flooring dropped by largest remainder, so the total is exact.
    total = int(round(want.sum()))
    for j in np.argsort(-(want - counts), kind="stable")[: max(0, total - int(counts.sum()))]:
        counts[j] += 1
    parts = []
    for i, (ids, c) in enumerate(zip(train_ids, counts, strict=True)):
        if c == 0 or len(ids) == 0:
            continue
        reps: list[np.ndarray] = []
        k = 0
        while sum(int(len(r)) for r in reps) < c:
            reps.append(ids[np.random.default_rng([seed, 104729, i, k]).permutation(len(ids))])
            k += 1
        parts.append(np.concatenate(reps)[:c] + int(offsets[i]))
    allids = np.concatenate(parts)
    return allids[np.random.default_rng([seed, 1299709]).permutation(len(allids))]
