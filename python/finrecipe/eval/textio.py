"""Reading evaluation data files: JSONL items, and documents from JSONL / parquet / text files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finrecipe.errors import DataError


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped), at most `limit`; an error names the line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{i}: each line must be a JSON object")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{p}: no items")
    return rows


def read_texts(files: list[Path], fmt: str | None = None, text_field: str = "text",
               limit: int | None = None) -> list[str]:
    """Documents: one per JSONL line (`text_field`), per parquet row, or per text file."""
    texts: list[str] = []
    for f in files:
        f = Path(f)
        kind = fmt or ("jsonl" if f.suffix in (".jsonl", ".json") else "parquet" if f.suffix == ".parquet"
                       else "text")
        if not f.is_file():
            raise DataError(f"{f}: file not found")
        if kind == "jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{i}: not valid JSON ({e.msg})") from None
                if text_field not in row:
                    raise DataError(f"{f}:{i}: no field {text_field!r}")
                texts.append(str(row[text_field]))
        elif kind == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{f}: reading parquet needs pyarrow (pip install pyarrow)") from None
            texts += [str(x) for x in pq.read_table(f, columns=[text_field]).column(text_field).to_pylist()]
        else:
            texts.append(f.read_text(encoding="utf-8"))
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    return texts


__all__ = ["read_jsonl", "read_texts"]
