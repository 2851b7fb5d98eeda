"""Shared fixtures: tiny Hugging Face models (a few MB) built locally from transformers configs.

Everything here is session-scoped and built once per test run; no network is used.

- `tiny_model(arch, dtype="float32")`: a saved model directory (config, generation config,
  tokenizer, single-file safetensors) for arch in "llama", "qwen2", "gpt_neox".
- `related_models(arch, ...)`: a base directory and variants = base + small random deltas, saved as
  safetensors (single file, or sharded with `shard_bytes`). Useful for merging tests.
- helpers importable from tests: `save_state_dict`, `load_state_dict`, `make_tokenizer_files`,
  and for training tests `counting_corpus`, `SigtermAt`, `free_port`; the `one_torch_thread`
  fixture (use it module-wide with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from finrecipe.progress import NullProgress

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test recipes live in temporary directories and name models and data in other temporary
# directories: the person running the tests allows reading and writing there (see docs/security.md;
# tests of the trust boundary itself clear this).
os.environ.setdefault("FINRECIPE_ALLOW_PATHS", __import__("tempfile").gettempdir())

ARCHS = ("llama", "qwen2", "gpt_neox")
VOCAB = 128


def _config(arch: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4,
                                  max_position_embeddings=128, tie_word_embeddings=False,
                                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    raise ValueError(arch)


def make_tokenizer_files(out: Path) -> None:
    """A tiny word-level tokenizer saved in Hugging Face format (tokenizer.json + configs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out)


def save_state_dict(state: Mapping[str, Any], out: Path, *, shard_bytes: int | None = None,
                    metadata: Mapping[str, str] | None = None) -> list[str]:
    """Save tensors as `model.safetensors`, or as shards + index when `shard_bytes` is given.

    Returns the file names written. Tensor order is the mapping's order.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata or {"format": "pt"})
    if shard_bytes is None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata=meta)
        return ["model.safetensors"]
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for k, v in state.items():
        nb = v.numel() * v.element_size()
        if groups[-1] and size + nb > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v.contiguous()
        size += nb
    n = len(groups)
    wmap: dict[str, str] = {}
    names = []
    total = 0
    for i, g in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(g, str(out / fn), metadata=meta)
        names.append(fn)
        for k, v in g.items():
            wmap[k] = fn
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    return names


def load_state_dict(model_dir: Path) -> dict[str, Any]:
    """All tensors of a model directory (single file or sharded), in file order."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        files = list(dict.fromkeys(json.loads(idx.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(model_dir / f)))
    return out


def _build(arch: str, dtype: str, out: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    cfg = _config(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(getattr(torch, dtype))
    with torch.no_grad():  # random init gives tiny norms in some archs: make all weights nonzero
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p, dtype=torch.float32).to(p.dtype))
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=8).save_pretrained(out)
    make_tokenizer_files(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_model(arch, dtype="float32", seed=0)` -> a saved model directory (cached)."""
    cache: dict[tuple[str, str, int], Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(arch: str = "llama", dtype: str = "float32", seed: int = 0) -> Path:
        key = (arch, dtype, seed)
        if key not in cache:
            cache[key] = _build(arch, dtype, root / f"{arch}-{dtype}-{seed}", seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def related_models(tiny_model: Callable[..., Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """`related_models(arch="llama", dtype="float32", n=2, scale=0.01, shard_bytes=None, seed=1)`
    -> {"base": dir, "m1": dir, "m2": dir, ...}: variants are base + scale·N(0,1) per tensor, saved in
    `dtype`, as one file or shards of `shard_bytes`. Each variant has the base's config and tokenizer.
    """
    cache: dict[tuple[Any, ...], dict[str, Path]] = {}
    root = tmp_path_factory.mktemp("related")

    def get(arch: str = "llama", dtype: str = "float32", n: int = 2, scale: float = 0.01,
            shard_bytes: int | None = None, seed: int = 1) -> dict[str, Path]:
        import torch

        key = (arch, dtype, n, scale, shard_bytes, seed)
        if key in cache:
            return cache[key]
        src = tiny_model(arch, "float32", 0)
        state = load_state_dict(src)
        tdt = getattr(torch, dtype)
        d = root / f"{arch}-{dtype}-{n}-{scale}-{shard_bytes}-{seed}"
        out: dict[str, Path] = {}
        g = torch.Generator().manual_seed(seed)
        for i in range(n + 1):
            name = "base" if i == 0 else f"m{i}"
            md = d / name
            md.mkdir(parents=True)
            st = {}
            for k, v in state.items():
                t = v if i == 0 else v + scale * torch.randn(v.shape, generator=g)
                st[k] = t.to(tdt)
            save_state_dict(st, md, shard_bytes=shard_bytes)
            for f in src.iterdir():
                if f.name.endswith(".json") and not f.name.startswith("model.safetensors"):
                    shutil.copy(f, md / f.name)
            cfg = json.loads((md / "config.json").read_text())
            cfg["dtype"] = dtype
            (md / "config.json").write_text(json.dumps(cfg, indent=2))
            out[name] = md
        cache[key] = out
        return out

    return get


# ------------------------------------------------------------------------------ training helpers
def counting_corpus(path: Path, n_docs: int = 120) -> Path:
    """A small repetitive JSONL corpus: counting sequences over a 24-word cycle (w3..w26)."""
    lines = []
    for i in range(n_docs):
        start = (i * 7) % 24
        n = 8 + (i * 5) % 24
        lines.append(json.dumps({"text": " ".join(f"w{3 + (start + j) % 24}" for j in range(n))}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """Tiny matmuls: one intra-op thread is faster and immune to the load of a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SigtermAt(NullProgress):
    """A progress sink that sends this process SIGTERM when the
    step counter reaches `step`; everything else is a no-op."""

    def __init__(self, step: int) -> None:
        self.step = step

    def task(self, description: str, total: float | None = None, unit: str = "it") -> Any:
        outer = self

        class T:
            def update(self, *, completed: float | None = None, **kw: Any) -> None:
                if completed == outer.step and unit == "step":
                    os.kill(os.getpid(), signal.SIGTERM)

            def __enter__(self) -> T:
                return self

            def __exit__(self, *a: object) -> None:
                return None

        return T()
