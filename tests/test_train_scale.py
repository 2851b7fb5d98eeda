"""Training at scale: the global batch is the recipe's, per-node launch settings are runtime (one
key and one output for every node), checkpoints go when a node is done, document-masked packing,
validation by document, bounded tokenization memory, and a launcher that owns its workers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finrecipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import counting_corpus, free_port  # noqa: E402
from test_train import BASE_CFG, _metrics, _run  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


# ---------------------------------------------------------------------------------- global batch
@pytest.mark.parametrize(("cfg", "world", "want"), [
    ({"micro_batch_size": 4, "grad_accum": 2}, 1, (4, 2, 8)),
    ({"micro_batch_size": 4, "grad_accum": 2}, 2, (4, 1, 8)),
    ({"micro_batch_size": 4, "grad_accum": 2}, 4, (2, 1, 8)),
    ({"micro_batch_size": 4, "grad_accum": 2}, 8, (1, 1, 8)),
    ({"micro_batch_size": 3, "global_batch_tokens": 12 * 32}, 2, (3, 2, 12)),
    ({"micro_batch_size": 4, "global_batch_tokens": 12 * 32}, 2, (3, 2, 12)),  # 6 = 3 × 2, not 4 + 2
    ({"micro_batch_size": 1, "global_batch_tokens": 12 * 32}, 3, (1, 4, 12)),
])
def test_global_batch_is_the_recipes_whatever_the_processes(cfg: dict[str, Any], world: int,
                                                            want: tuple[int, int, int]) -> None:
    from finrecipe.train.config import TrainConfig
    from finrecipe.train.trainer import batch_plan

    c = TrainConfig.model_validate({"model": "m", "datasets": ["d"], "seq_len": 32, **cfg})
    assert batch_plan(c, world) == want


def test_global_batch_that_cannot_be_split_is_a_clear_error() -> None:
    from finrecipe.train.config import TrainConfig
    from finrecipe.train.trainer import batch_plan

    c = TrainConfig.model_validate({"model": "m", "datasets": ["d"], "seq_len": 32, "micro_batch_size": 3})
    with pytest.raises(ConfigError, match=r"global batch of 3 sequences \(96 tokens\) cannot be split evenly "
                                          r"over 2 processes; set global_batch_tokens to a multiple of "
                                          r"seq_len × processes = 32 × 2 \(e.g. 128\)"):
        batch_plan(c, 2)


# ------------------------------------------------------------------------- runtime launch settings
def _recipe(root: Path, model: Path, corpus: Path, launch: dict[str, Any]) -> Path:
    p = root / f"recipe-{len(list(root.glob('recipe-*')))}.yaml"
    p.write_text(json.dumps({
        "finrecipe": 1, "name": "nodes", "workdir": str(root / "work"),
        "models": {"base": {"path": str(model)}},
        "datasets": {"corpus": {"files": str(corpus)}},
        "stages": {"cpt": {"type": "continual_pretraining", "model": "base", "datasets": ["corpus"],
                           "seq_len": 32, "launch": launch}},
    }))
    return p


def test_two_nodes_resolve_the_same_key(tiny_model: Callable[..., Path], corpus: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """node_rank, master address and port are per-node runtime settings: node 0 and node 1 of a
    two-node run (in the recipe or from the environment) resolve one key, hence one output dir."""
    import finrecipe

    def key(launch: dict[str, Any], env: dict[str, str]) -> str:
        for var in ("FINRECIPE_NODE_RANK", "FINRECIPE_MASTER_ADDR", "FINRECIPE_MASTER_PORT"):
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        r = finrecipe.load_recipe(_recipe(tmp_path, tiny_model("llama"), corpus, launch))
        return next(n.key for n in r.plan().nodes if n.name == "cpt")

    two = {"nproc_per_node": 2, "nnodes": 2}
    k0 = key({**two, "node_rank": 0, "master_addr": "10.0.0.1", "master_port": 29500}, {})
    k1 = key({**two, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500}, {})
    k_env = key(two, {"FINRECIPE_NODE_RANK": "1", "FINRECIPE_MASTER_ADDR": "node0", "FINRECIPE_MASTER_PORT": "29600"})
    k_port = key({**two, "master_port": 31000}, {})
    assert k0 == k1 == k_env == k_port
    assert key({"nproc_per_node": 2, "nnodes": 1}, {}) != k0  # the shape of the run stays in the key


def test_runtime_launch_settings_come_from_the_environment() -> None:
    from finrecipe.train.config import LaunchConfig

    la = LaunchConfig(nproc_per_node=8, nnodes=2)
    got = la.with_runtime({"FINRECIPE_NODE_RANK": "1", "FINRECIPE_MASTER_ADDR": "node0",
                           "FINRECIPE_MASTER_PORT": "29600"})
    assert (got.node_rank, got.master_addr, got.master_port, got.nproc_per_node) == (1, "node0", 29600, 8)
    assert la.with_runtime({}) == la
    with pytest.raises(ConfigError, match="FINRECIPE_NODE_RANK.*not valid"):
        la.with_runtime({"FINRECIPE_NODE_RANK": "first"})


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_kept_after_done_only_when_asked(tiny_model: Callable[..., Path], corpus: Path,
                                                     tmp_path: Path) -> None:
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 4, "checkpoint_every_steps": 1, "keep_checkpoints_after_done": True}
    _run("continual_pretraining", cfg, tiny_model("llama"), corpus, tmp_path / "keep", tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "keep" / "work" / "ckpt").iterdir()) == ["step-2", "step-3"]
    assert [r["step"] for r in _metrics(tmp_path / "keep") if "loss" in r] == [1, 2, 3, 4]
    # A rerun of the finished node drops them once the option is off (it is not in the cache key).
    _run("continual_pretraining", {**cfg, "keep_checkpoints_after_done": False}, tiny_model("llama"), corpus,
         tmp_path / "keep", tmp_path / "cache")
    assert not (tmp_path / "keep" / "work" / "ckpt").exists()
    assert (tmp_path / "keep" / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------- launcher
def _procs_with(text: str) -> list[int]:
    """Pids whose command line mentions `text` (our run's spec path)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out.append(int(p.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_apply_leaves_no_workers_and_reapply_has_no_duplicate_steps(
        tiny_model: Callable[..., Path], corpus: Path, tmp_path: Path) -> None:
    """`apply` (here: a process running the stage) launches 2 gloo workers under torchrun and is
    SIGKILLed mid-run: torchrun and both workers go with it; running again resumes from the last
    checkpoint and every step appears once in metrics.jsonl."""
    import os
    import signal
    import subprocess
    import textwrap
    import time

    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 60, "checkpoint_every_steps": 2,
           "launch": {"nproc_per_node": 2, "master_port": free_port()}}
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from test_train import _run
        from finrecipe.progress import NullProgress

        class Kill(NullProgress):
            def task(self, description, total=None, unit="it"):
                class T:
                    def update(self, *, completed=None, **kw):
                        if unit == "step" and completed is not None and completed >= 5:
                            os.kill(os.getpid(), signal.SIGKILL)
                    def __enter__(self): return self
                    def __exit__(self, *a): return None
                return T()

        _run("continual_pretraining", json.loads({json.dumps(cfg)!r}), Path({str(tiny_model('llama'))!r}),
             Path({str(corpus)!r}), Path({str(out)!r}), Path({str(tmp_path / 'cache')!r}), progress=Kill())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    spec = str(out / "work" / "launch.json")
    deadline = time.monotonic() + 10
    while _procs_with(spec) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _procs_with(spec)
    for pid in left:  # do not leave them running if the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], "torchrun or its workers outlived the launcher"
    steps_before = [r["step"] for r in _metrics(out) if "loss" in r]
    assert 5 <= len(steps_before) < 60
    res = _run("continual_pretraining", {**cfg, "launch": {**cfg["launch"], "master_port": free_port()}},
               tiny_model("llama"), corpus, out, tmp_path / "cache")
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, 61))
    assert res.metrics["steps"] == 60 and res.metrics["world_size"] == 2
    assert "resuming from step" in (out / "work" / "torchrun.log").read_text()


def test_a_new_launch_waits_for_surviving_workers(tmp_path: Path) -> None:
    """A worker of an earlier launch still holding the run's worker lock blocks a new launch,
    which says so instead of training a second copy into the same directory."""
    import subprocess

    from finrecipe.errors import StageError
    from finrecipe.train import runner
    from finrecipe.train.config import RunSpec

    work = tmp_path / "out" / "work"
    work.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from finrecipe.train.runner import "
                               f"hold_worker_lock; hold_worker_lock(Path({str(work)!r}), 0); print('ok', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        spec = RunSpec(config={**BASE_CFG, "launch": {"nproc_per_node": 2}}, model_dir="m",
                       out_dir=str(tmp_path / "out"), train_shards=[])
        old = runner.ORPHAN_WAIT_S
        runner.ORPHAN_WAIT_S = 0.5
        try:
            with pytest.raises(StageError, match="workers of an earlier launch are still running"):
                runner.execute(spec)
        finally:
            runner.ORPHAN_WAIT_S = old
        assert not (work / "launch.json").exists()  # nothing was launched
        # A worker of another node of the same run (shared storage) does not block this node.
        runner._wait_for_orphans(work, 1, runner.log)  # returns at once
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- documents, packing
@pytest.fixture(scope="module")
def tok(tiny_model: Callable[..., Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama"))


def _docs_file(path: Path, docs: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(f"w{w}" for w in d)}) + "\n" for d in docs))
    return path


def _ref(path: Path, fmt: str = "jsonl") -> Any:
    from finrecipe.types import DatasetRef

    return DatasetRef(name=path.stem, files=(path,), format=fmt)  # type: ignore[arg-type]


def test_document_masked_batch_equals_each_document_alone(tiny_model: Callable[..., Path], tok: Any,
                                                          tmp_path: Path) -> None:
    """A packed sequence holding three documents gives every token the loss it has when its
    document is run alone after an EOS (the one that ended the previous document), from position
    0; the first document (cut at the sequence start) alone from position 0. Stream packing
    differs."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from finrecipe.train.data import SequenceSet, tokenize_pretraining
    from finrecipe.train.trainer import _make_batch

    docs = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37]]
    sh = tokenize_pretraining(_ref(_docs_file(tmp_path / "d.jsonl", docs)), tok, tmp_path / "cache")
    eos = tok.eos_token_id
    assert sh.has_docs and sh.doc_ends().tolist() == [7, 11, 20]  # type: ignore[union-attr]
    seqs = SequenceSet([sh], 16)
    x, y, pos = _make_batch(seqs, np.array([0]), documents=True)
    assert pos is not None and x[0, 6].item() == eos and x[0, 10].item() == eos
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert (y[0, :-1] == x[0, 1:]).all()  # every next token is a target, EOS → first word included
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as the trainer has it (with a cache, transformers ignores packing)
    model.eval()
    with torch.no_grad():
        packed = F.cross_entropy(model(input_ids=x, position_ids=pos).logits[0], y[0], reduction="none",
                                 ignore_index=-100)
        stream = F.cross_entropy(model(input_ids=x).logits[0], y[0], reduction="none", ignore_index=-100)
        alone = [F.cross_entropy(model(input_ids=x[:, lo:hi]).logits[0], y[0, lo:hi], reduction="none",
                                 ignore_index=-100) for lo, hi in [(0, 6), (6, 10), (10, 16)]]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stream[6:15], packed[6:15], atol=1e-4)


def test_sequences_over_document_ranges_and_their_starts(tok: Any, tmp_path: Path) -> None:
    import numpy as np

    from finrecipe.train.data import SequenceSet, tokenize_pretraining

    docs = [[3 + i] * (2 + i) for i in range(8)]  # doc i: i + 2 words + EOS
    sh = tokenize_pretraining(_ref(_docs_file(tmp_path / "d.jsonl", docs)), tok, tmp_path / "cache")
    ends = sh.doc_ends()
    assert ends is not None and ends[:6].tolist() == [3, 7, 12, 18, 25, 33]
    all_toks = np.asarray(sh.tokens())
    # Documents 1, 2 and 5 only: [3, 12) ∪ [25, 33) as one stream of 17 tokens → 3 sequences of 5.
    view = np.array([[ends[0], ends[2]], [ends[4], ends[5]]])
    s = SequenceSet([sh], 5, views=[view])
    assert s.counts == [3]
    want = np.concatenate([all_toks[3:12], all_toks[25:33]])
    got = [s.get(i) for i in range(3)]
    assert np.concatenate([t for t, _, _ in got]).tolist() == want[:15].tolist()
    assert got[0][2].tolist() == [4]  # document 2 starts after document 1's 3 words + EOS
    assert got[1][2].tolist() == [4]  # the join: document 5 starts at stream position 9 = 5 + 4
    assert got[2][2].tolist() == []


def test_validation_holds_out_whole_documents() -> None:
    import numpy as np

    from finrecipe.train.data import split_documents

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=300)
    ends = np.cumsum(lengths)
    train, val = split_documents(ends, 0.1, seed=3, index=0)
    other = split_documents(ends, 0.1, seed=4, index=0)[1]
    assert other.shape != val.shape or not np.array_equal(other, val)  # another seed, other documents
    for a, b in zip(split_documents(ends, 0.1, seed=3, index=0), (train, val), strict=True):
        assert np.array_equal(a, b)  # seeded
    covered = np.zeros(int(ends[-1]), dtype=int)
    starts = set(np.concatenate([[0], ends[:-1]]).tolist())
    for r in (train, val):
        for lo, hi in r:
            covered[lo:hi] += 1
            assert lo in starts and hi in set(ends.tolist())  # whole documents only
    assert (covered == 1).all()  # every token on exactly one side
    held = sum(int(hi - lo) for lo, hi in val) / int(ends[-1])
    assert 0.1 <= held < 0.1 + 200 / int(ends[-1]) + 1e-9
    t, v = split_documents(np.array([10, 20]), 0.9, seed=0, index=0)
    assert len(t) == 1 and len(v) == 1  # at least one document on each side
    t, v = split_documents(np.array([10, 20]), 0.0, seed=0, index=0)
    assert t.tolist() == [[0, 20]] and len(v) == 0


def test_continual_pretraining_default_and_stream_option(tiny_model: Callable[..., Path], corpus: Path,
                                                         tmp_path: Path) -> None:
    """Document-masked packing is the default (and trains); `packing: stream` is the old mode; the
    held-out validation documents are not trained on."""
    from finrecipe.stages.base import get_kind

    k = get_kind("continual_pretraining")
    assert k.version == "2" and k.Config.model_validate(BASE_CFG).packing == "documents"
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 6, "validation": {"fraction": 0.1}}
    doc = _run("continual_pretraining", cfg, tiny_model("llama"), corpus, tmp_path / "doc", tmp_path / "cache")
    st = _run("continual_pretraining", {**cfg, "packing": "stream"}, tiny_model("llama"), corpus,
              tmp_path / "st", tmp_path / "cache")
    a = [r for r in _metrics(tmp_path / "doc") if "loss" in r]
    b = [r for r in _metrics(tmp_path / "st") if "loss" in r]
    assert a[-1]["loss"] < a[0]["loss"] and b[-1]["loss"] < b[0]["loss"]
    assert a[0]["loss"] != b[0]["loss"]
    assert a[0]["target_tokens"] == b[0]["target_tokens"]  # the same targets, other contexts
    assert doc.metrics["final_val_loss"] is not None and st.metrics["final_val_loss"] is not None


def test_finetune_keeps_its_packing() -> None:
    from finrecipe.stages.base import get_kind

    k = get_kind("finetune")
    assert k.version == "1" and "packing" in k.Config.model_fields
    assert k.packing(k.Config.model_validate(BASE_CFG)) == "stream"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------- long documents
def test_long_documents_are_tokenized_in_pieces(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A document longer than a piece gives the tokens of the whole document (cut at line ends,
    one EOS at its end), from jsonl and from a text file, leading whitespace included."""
    import numpy as np

    from finrecipe.train import data

    monkeypatch.setattr(data, "PIECE_CHARS", 64)
    monkeypatch.setattr(data, "BATCH_CHARS", 100)
    lines = [" ".join(f"w{3 + (i * 7 + j) % 100}" for j in range(i % 9 + 1)) for i in range(60)]
    text = "\n".join(lines) + "\n"
    eos = tok.eos_token_id
    whole = list(tok(text, add_special_tokens=True)["input_ids"]) + [eos]
    short = list(tok("w9 w10", add_special_tokens=True)["input_ids"]) + [eos]
    j = tmp_path / "long.jsonl"
    j.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "w9 w10"}) + "\n")
    sh = data.tokenize_pretraining(_ref(j), tok, tmp_path / "c1")
    assert np.asarray(sh.tokens()).tolist() == whole + short
    assert sh.doc_ends().tolist() == [len(whole), len(whole) + len(short)]  # type: ignore[union-attr]
    t = tmp_path / "long.txt"
    t.write_text(" \n" * 50 + text)  # 100 characters of whitespace first: pieces with no text
    sh = data.tokenize_pretraining(_ref(t, "text"), tok, tmp_path / "c2")
    assert np.asarray(sh.tokens()).tolist() == list(tok(" \n" * 50 + text)["input_ids"]) + [eos]
    assert sh.doc_ends().tolist() == [sh.n_tokens]  # type: ignore[union-attr]
    (tmp_path / "blank.txt").write_text(" \n" * 200)
    from finrecipe.errors import DataError

    with pytest.raises(DataError, match="blank.txt: empty file"):
        data.tokenize_pretraining(_ref(tmp_path / "blank.txt", "text"), tok, tmp_path / "c3")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(("w3 w4\n" * 40).encode() + b"w5 \xff\n")
    with pytest.raises(DataError, match=r"bad.txt:41: not valid UTF-8"):
        data.tokenize_pretraining(_ref(bad, "text"), tok, tmp_path / "c4")


@pytest.mark.slow
def test_tokenizing_one_200mb_document_keeps_memory_bounded(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """One 200 MB document (`format: text`: the file is the document) is tokenized with memory
    growth well below the document's own size (whole, it took ~0.6 KB per token)."""
    import subprocess

    big = tmp_path / "big.txt"
    words = " ".join(f"w{3 + i % 100} unknownword{i % 7}" for i in range(1000)) + "\n"
    n_lines = (200 * 1024 * 1024) // len(words)
    with open(big, "w") as f:
        for _ in range(n_lines // 100):
            f.write(words * 100)
    n_words = (n_lines // 100) * 100 * 2000
    script = f"""
import resource, sys
from pathlib import Path
from transformers import AutoTokenizer
from finrecipe.train.data import tokenize_pretraining
from finrecipe.types import DatasetRef
tok = AutoTokenizer.from_pretrained({str(tiny_model('llama'))!r})
tok("w3 w4")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sh = tokenize_pretraining(DatasetRef("big", (Path({str(big)!r}),), "text"), tok, Path({str(tmp_path / 'cache')!r}))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(sh.n_tokens, sh.doc_ends().tolist(), (peak - base) // 1024)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    head, grew = p.stdout.strip().rsplit(" ", 1)
    n_tokens, ends = head.split(" ", 1)
    grew_mb = int(grew)
    assert int(n_tokens) == n_words + 1 and json.loads(ends) == [n_words + 1]
    assert big.stat().st_size > 200 * 1000 * 1000
    assert grew_mb < 100, f"memory grew by {grew_mb} MB while tokenizing a 200 MB document"


def test_launcher_follows_only_new_metrics(tmp_path: Path) -> None:
    from finrecipe.train.runner import _Follow

    p = tmp_path / "metrics.jsonl"
    f = _Follow(p)
    assert f.new_records() == []
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert f.new_records() == [{"step": 1, "loss": 2.0}]
    with open(p, "a") as fh:
        fh.write('ss": 1.5}\n')
    assert f.new_records() == [{"step": 2, "loss": 1.5}]
    assert f.new_records() == []
    p.write_text('{"step": 1, "loss": 2.0}\n')  # rewritten shorter (a resume truncates)
    assert f.new_records() == [{"step": 1, "loss": 2.0}]
