"""Training data: read documents, tokenize, pack into uint32 memmap shards, mix, split.

Layout of one tokenized dataset in the cache (``<cache_dir>/tokens/<key>/``)::

    tokens.bin   uint32, all documents concatenated (BOS as the tokenizer adds it, EOS after each)
    mask.bin     uint8, 1 where the token is a training target (finetune data only)
    docs.bin     uint64, the token offset just past each document (pretraining data only)
    index.json   {"n_tokens", "n_docs", "seq_len" (finetune only), "tokenizer", "files",
                  "sha256": {file: digest}, ...}: a shard whose files do not match is rebuilt

The key hashes the tokenizer (its serialized JSON and special tokens), the data files' sha256 and
the reading options, so reruns and other stages reuse the same shards. Continual-pretraining tokens
do not depend on the sequence length: sequences are cut from the stream at training time.

Mixing (``build_order``): dataset *i* with ``n_i`` training sequences and weight ``w_i`` contributes
``round(w_i * n_i)`` sequences per epoch (weight 1 = natural size, 0.5 = half, 2 = twice); with a
token budget the counts are scaled to the budget in the same proportions. Each dataset's sequences
are drawn from seeded permutations (a fresh permutation each time one runs out), and the whole
epoch is shuffled with the seed. The result is one int64 array of global sequence ids: the
training order; a position in it is the data position saved in checkpoints.

Validation (``validation.fraction``) holds out whole documents of pretraining data
(``split_documents``): sequences are cut from the training documents and from the held-out
documents separately, so no document is in both. Instruction rows are held out row by row.
"""

from __future__ import annotations

import codecs
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

DATA_VERSION = "1"  # instruction data
PRETRAIN_VERSION = "2"  # pretraining data (2: docs.bin, long documents in pieces)
TOKENIZE_BATCH = 512  # documents per tokenizer call
PIECE_CHARS = 1 << 18  # longer documents are tokenized in pieces of at most this many characters
BATCH_CHARS = 1 << 20  # characters per tokenizer call (bounds the tokenizer's memory)


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
    has_docs: bool = False  # docs.bin: where each document ends (pretraining data)

    def tokens(self) -> np.memmap:
        return np.memmap(self.dir / "tokens.bin", dtype=np.uint32, mode="r", shape=(self.n_tokens,))

    def mask(self) -> np.memmap | None:
        if not self.has_mask:
            return None
        return np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r", shape=(self.n_tokens,))

    def doc_ends(self) -> np.ndarray | None:
        """Token offset just past each document (its EOS), increasing; None without docs.bin."""
        if not self.has_docs:
            return None
        return np.fromfile(self.dir / "docs.bin", dtype=np.uint64).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dir": str(self.dir), "n_tokens": self.n_tokens, "weight": self.weight,
                "seq_len": self.seq_len, "has_mask": self.has_mask, "has_docs": self.has_docs}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenShard:
        return cls(name=d["name"], dir=Path(d["dir"]), n_tokens=int(d["n_tokens"]),
                   weight=float(d["weight"]), seq_len=d.get("seq_len"), has_mask=bool(d["has_mask"]),
                   has_docs=bool(d.get("has_docs", False)))


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
        has_docs = bool(meta.get("has_docs", False))
        want = {"tokens.bin": 4 * n, **({"mask.bin": n} if has_mask else {}),
                **({"docs.bin": 8 * int(meta["n_docs"])} if has_docs else {})}
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
                      seq_len=meta.get("seq_len"), has_mask=has_mask, has_docs=has_docs)


def _encode_batch(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    # A fast tokenizer encodes a batch on all cores (Rust, rayon).
    out = tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
    return [list(x) for x in out]


def _split_long(text: str, piece: int) -> list[str]:
    """``text`` in pieces of at most ``piece`` characters, cut after a line end where there is one
    in the second half of the piece (else after a space, else anywhere)."""
    if len(text) <= piece:
        return [text]
    out = []
    i = 0
    while len(text) - i > piece:
        j = i + piece
        k = text.rfind("\n", i + piece // 2, j)
        if k < 0:
            k = text.rfind(" ", i + piece // 2, j)
        j = k + 1 if k >= 0 else j
        out.append(text[i:j])
        i = j
    out.append(text[i:])
    return out


def _text_file_pieces(file: Path, piece: int) -> Iterator[str]:
    """A text file (one document) as pieces of at most ``piece`` characters, read incrementally."""
    dec = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    line = 1
    with open(file, "rb") as f:
        while True:
            block = f.read(piece)
            try:
                buf += dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = line + block[: max(e.start, 0)].count(b"\n")
                raise DataError(f"{file}:{at}: not valid UTF-8 ({e.reason}); re-encode the file as "
                                "UTF-8") from None
            line += block.count(b"\n")
            if not block:
                break
            if len(buf) > piece:
                parts = _split_long(buf, piece)
                yield from parts[:-1]
                buf = parts[-1]
    if buf:
        yield buf


def iter_document_pieces(ref: DatasetRef, piece: int) -> Iterator[tuple[str, bool, bool]]:
    """(text, first, last) for every document of a text dataset, each document in pieces of at
    most ``piece`` characters, so that memory does not grow with the size of one document."""
    if ref.format != "text":
        for file, line, rec in iter_records(ref):
            parts = _split_long(_field(rec, ref.text_field, file, line), piece)
            for k, part in enumerate(parts):
                yield part, k == 0, k == len(parts) - 1
        return
    if not ref.files:
        raise DataError(f"dataset {ref.name!r}: no files")
    for file in ref.files:
        if not file.is_file():
            raise DataError(f"dataset {ref.name!r}: {file}: file not found")
        held: list[str] = []  # pieces not yet yielded: leading whitespace, or the latest piece
        has_text = False
        first = True
        for part in _text_file_pieces(file, piece):
            if not has_text and part.strip():
                has_text = True
            held.append(part)
            # Yield all but the latest piece (the last one must be flagged), once there is text.
            while has_text and len(held) > 1:
                yield held.pop(0), first, False
                first = False
        if not has_text:  # no document (whitespace only)
            raise DataError(f"{file}: empty file (no documents); remove it from dataset {ref.name!r} "
                            "or add data")
        yield held[0], first, True


def _write(f: Any, data: bytes, path: Path, sync: bool = False) -> None:
    """Write (and optionally flush + fsync) an open file; an OSError names ``path`` (a write on
    an open file does not say which file failed)."""
    try:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), for documents tokenized in
    pieces without special tokens."""
    ids = list(tokenizer("", add_special_tokens=True, return_attention_mask=False)["input_ids"])
    while ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return ids


def tokenize_pretraining(ref: DatasetRef, tokenizer: Any, cache_dir: Path,
                         progress: Progress | None = None, weight: float | None = None) -> TokenShard:
    """Tokenize a text dataset (EOS after every document) into the cache, or reuse it.

    Documents longer than ``PIECE_CHARS`` characters are tokenized in pieces (cut at line ends
    where possible; the tokenizer's special prefix once, EOS after the last piece), and batches
    hold at most ``BATCH_CHARS`` characters, so memory stays bounded whatever the size of one
    document. ``docs.bin`` records where each document ends."""
    progress = progress or NullProgress()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token")
    key_src = {"v": PRETRAIN_VERSION, "kind": "pretrain", "tok": tokenizer_fingerprint(tokenizer),
               "data": dataset_fingerprint(ref), "format": ref.format, "field": ref.text_field}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:32]
    dest = cache_dir / "tokens" / key
    w = ref.weight if weight is None else weight
    hit = _load_shard(dest, ref.name, w)
    if hit is not None:
        return hit
    prefix = _special_prefix(tokenizer)
    n_tokens = n_docs = 0
    h_tok, h_docs = hashlib.sha256(), hashlib.sha256()
    with atomic_dir(dest, overwrite=True) as tmp, open(tmp / "tokens.bin", "wb") as out, \
            open(tmp / "docs.bin", "wb") as docs_out, \
            progress.task(f"tokenize {ref.name}", total=None, unit="doc") as task:
        batch: list[tuple[str, bool, bool]] = []
        chars = 0

        def flush() -> None:
            nonlocal n_tokens, n_docs, chars
            whole = [k for k, (_, first, last) in enumerate(batch) if first and last]
            parts = [k for k, (_, first, last) in enumerate(batch) if not (first and last)]
            ids: dict[int, list[int]] = {}
            if whole:
                ids.update(zip(whole, _encode_batch(tokenizer, [batch[k][0] for k in whole], True), strict=True))
            if parts:
                ids.update(zip(parts, _encode_batch(tokenizer, [batch[k][0] for k in parts], False), strict=True))
            flat: list[int] = []
            ends: list[int] = []
            for k, (_, first, last) in enumerate(batch):
                x = ids[k]
                if first and not last:
                    flat.extend(prefix)
                flat.extend(x)
                if last:
                    if not (first and x and x[-1] == eos):
                        flat.append(eos)
                    ends.append(n_tokens + len(flat))
            arr = np.asarray(flat, dtype=np.uint32).tobytes()
            _write(out, arr, dest / "tokens.bin")
            h_tok.update(arr)
            darr = np.asarray(ends, dtype=np.uint64).tobytes()
            _write(docs_out, darr, dest / "docs.bin")
            h_docs.update(darr)
            n_tokens += len(flat)
            n_docs += len(ends)
            task.update(advance=len(ends))
            batch.clear()
            chars = 0

        for text, first, last in iter_document_pieces(ref, PIECE_CHARS):
            batch.append((text, first, last))
            chars += len(text)
            if len(batch) >= TOKENIZE_BATCH or chars >= BATCH_CHARS:
                flush()
        if batch:
            flush()
        for f, name in ((out, "tokens.bin"), (docs_out, "docs.bin")):
            _write(f, b"", dest / name, sync=True)
        write_json_atomic(tmp / "index.json", {
            **key_src, "n_tokens": n_tokens, "n_docs": n_docs, "has_mask": False, "has_docs": True,
            "sha256": {"tokens.bin": h_tok.hexdigest(), "docs.bin": h_docs.hexdigest()},
            "files": [str(f) for f in ref.files]}, indent=1)
    return TokenShard(name=ref.name, dir=dest, n_tokens=n_tokens, weight=w, has_docs=True)


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
        for name, arr in (("tokens.bin", np.asarray(tokens, dtype=np.uint32)),
                          ("mask.bin", np.asarray(mask, dtype=np.uint8))):
            with open(tmp / name, "wb") as f:
                _write(f, arr.tobytes(), dest / name, sync=True)
        write_json_atomic(tmp / "index.json", {
            **key_src, "n_tokens": len(tokens), "n_docs": n_docs, "has_mask": True,
            "sha256": {f: _file_sha256(tmp / f) for f in ("tokens.bin", "mask.bin")},
            "files": [str(f) for f in ref.files]}, indent=1)
    return TokenShard(name=ref.name, dir=dest, n_tokens=len(tokens), weight=w, seq_len=seq_len,
                      has_mask=True)


# ------------------------------------------------------------------------ sequences, mix, split
class SequenceSet:
    """Fixed-length sequences cut from several token shards, addressed by one global id.

    ``views`` (one per shard, optional): the ``[start, end)`` token ranges of the shard the
    sequences are cut from, as if they were one stream (whole documents, e.g. the training or the
    held-out documents); default: the whole shard. ``get`` also returns where documents start
    inside the sequence (from the shard's docs.bin and the joins between ranges)."""

    def __init__(self, shards: Sequence[TokenShard], seq_len: int,
                 views: Sequence[np.ndarray | None] | None = None, allow_empty: bool = False) -> None:
        self.shards = list(shards)
        self.seq_len = seq_len
        self._tokens = [s.tokens() for s in self.shards]
        self._masks = [s.mask() for s in self.shards]
        self._ends = [s.doc_ends() for s in self.shards]
        vs = list(views) if views is not None else [None] * len(self.shards)
        self._runs = [np.array([[0, s.n_tokens]], dtype=np.int64) if v is None else np.asarray(v, dtype=np.int64)
                      .reshape(-1, 2) for s, v in zip(self.shards, vs, strict=True)]
        self._run_starts = [np.concatenate([[0], np.cumsum(r[:, 1] - r[:, 0])]) for r in self._runs]
        self.counts = [int(rs[-1]) // seq_len for rs in self._run_starts]
        self.offsets = np.cumsum([0, *self.counts])
        for s, c in zip(self.shards, self.counts, strict=True):
            if c == 0 and not allow_empty:
                raise DataError(f"dataset {s.name!r} has {s.n_tokens} tokens, fewer than one sequence "
                                f"of seq_len={seq_len}; add data or lower seq_len")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, gid: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Tokens (int64, seq_len), loss mask (uint8 or None) and the positions (> 0) inside the
        sequence where a document starts, of a global sequence id."""
        i = int(np.searchsorted(self.offsets, gid, side="right") - 1)
        j = gid - int(self.offsets[i])
        a, b = j * self.seq_len, (j + 1) * self.seq_len
        runs, rs, m, ends = self._runs[i], self._run_starts[i], self._masks[i], self._ends[i]
        if len(runs) == 1:  # one stream: a plain slice
            p = int(runs[0, 0])
            pieces = [(p + a, p + b)]
        else:
            pieces = []
            k = int(np.searchsorted(rs, a, side="right") - 1)
            pos = a
            while pos < b:
                lo = int(runs[k, 0]) + pos - int(rs[k])
                hi = min(int(runs[k, 1]), lo + b - pos)
                pieces.append((lo, hi))
                pos += hi - lo
                k += 1
        toks = np.concatenate([np.asarray(self._tokens[i][lo:hi], dtype=np.int64) for lo, hi in pieces])
        mask = None if m is None else np.concatenate([np.asarray(m[lo:hi]) for lo, hi in pieces])
        starts: list[int] = []
        at = 0
        for lo, hi in pieces:
            if at > 0:
                starts.append(at)  # ranges hold whole documents: a join starts one
            if ends is not None:
                inside = ends[np.searchsorted(ends, lo, side="right"):np.searchsorted(ends, hi, side="left")]
                starts.extend(int(e - lo + at) for e in inside)
            at += hi - lo
        return toks, mask, np.asarray(sorted(set(starts)), dtype=np.int64)


def split_documents(doc_ends: np.ndarray, fraction: float, seed: int, index: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded random set of whole documents with about ``fraction`` of the tokens (at
    least one document, never all). Returns (train ranges, held-out ranges), each an (n, 2) array
    of ``[start, end)`` token ranges in order, adjacent documents merged."""
    n = len(doc_ends)
    starts = np.concatenate([[0], doc_ends[:-1]])
    lengths = doc_ends - starts
    held = np.zeros(n, dtype=bool)
    if fraction > 0 and n > 1:
        perm = np.random.default_rng([seed, 7919, index]).permutation(n)
        want = fraction * float(doc_ends[-1])
        k = int(np.searchsorted(np.cumsum(lengths[perm]), want, side="left")) + 1
        held[perm[:min(max(k, 1), n - 1)]] = True

    def ranges(sel: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(sel)
        if len(idx) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        first = np.concatenate([[0], brk])
        last = np.concatenate([brk - 1, [len(idx) - 1]])
        return np.stack([starts[idx[first]], doc_ends[idx[last]]], axis=1).astype(np.int64)

    return ranges(~held), ranges(held)


def split_heldout(counts: Sequence[int], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per dataset: (train local ids, held-out local ids); held-out is a seeded random ``fraction``
    of the sequences (data without document boundaries: instruction rows)."""
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
