"""Held-out perplexity as bits per byte (lm-eval's rolling log-likelihood, disjoint windows).

Each document is tokenized without special tokens; the first window is ``[prefix] + tokens[:L-1]``
predicting ``tokens[:L]`` (prefix = BOS, else EOS), later windows predict the next L tokens from the
L tokens before them' last L (lm-eval's ``get_rolling_token_windows`` with context_len 1).
bits/byte = −Σ log p / (ln 2 · Σ UTF-8 bytes of the documents).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from finrecipe.errors import DataError
from finrecipe.progress import NullProgress, Progress


def read_texts(files: list[Path], fmt: str | None = None, text_field: str = "text",
               limit: int | None = None) -> list[str]:
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


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, predicted ids): inputs are at most max_len long; targets are the last len(pred)."""
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    out.append(([prefix] + tokens[:first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        inp = tokens[max(0, end - max_len - 1):end - 1]
        out.append((inp, tokens[end - n:end]))
        done = end
    return out


def bits_per_byte(model: Any, tokenizer: Any, files: list[Path], *, fmt: str | None = None,
                  text_field: str = "text", max_length: int | None = None, limit: int | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    import torch

    from finrecipe.eval.scoring import model_max_length, prefix_token_id

    progress = progress or NullProgress()
    texts = read_texts(files, fmt, text_field, limit)
    if not texts:
        raise DataError("perplexity: no documents")
    L = max_length or model_max_length(model, tokenizer)
    prefix = prefix_token_id(tokenizer)
    device = next(model.parameters()).device
    nll = 0.0
    n_bytes = 0
    n_tokens = 0
    with progress.task("perplexity", total=len(texts)) as task, torch.inference_mode():
        for t in texts:
            n_bytes += len(t.encode("utf-8"))
            ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
            for inp, pred in rolling_windows(ids, prefix, L):
                x = torch.tensor([inp], device=device)
                logp = torch.log_softmax(model(input_ids=x).logits[0].float(), dim=-1)
                tgt = torch.tensor(pred, device=device)
                rows = logp[len(inp) - len(pred):]
                nll -= rows.gather(1, tgt.unsqueeze(1)).sum().item()
                n_tokens += len(pred)
            task.update(advance=1)
    bpb = nll / (math.log(2) * max(n_bytes, 1))
    return {"metric": "bits_per_byte", "value": bpb, "stderr": None, "n": len(texts), "higher_is_better": False,
            "metrics": {"bits_per_byte": bpb, "token_perplexity": math.exp(nll / max(n_tokens, 1)),
                        "tokens": n_tokens, "bytes": n_bytes}}
