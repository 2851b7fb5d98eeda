"""The trainer end to end on a tiny Llama (CPU): loss drops, SIGTERM/SIGKILL resume is bit-identical,
2-process torchrun FSDP2 matches one process, the exported model loads and merges, finetune trains."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finrecipe.errors import ConfigError, StageError
from finrecipe.progress import NullProgress
from finrecipe.stages.base import DatasetRef, ModelRef, StageContext, StageResult, get_kind

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SigtermAt, counting_corpus, free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


BASE_CFG: dict[str, Any] = dict(
    model="base", datasets=["corpus"], seq_len=32, micro_batch_size=2, grad_accum=2,
    optimizer=dict(lr=3e-3, weight_decay=0.01), schedule=dict(kind="cosine", warmup_steps=2),
    checkpoint_every_steps=3, seed=0,
)


def _run(kind: str, cfg: dict[str, Any], model: Path, data: Path, out: Path, cache: Path,
         progress: Any = None) -> StageResult:
    k = get_kind(kind)
    config = k.Config.model_validate(cfg)
    inputs = {"base": ModelRef("base", model), "corpus": DatasetRef("corpus", (data,), "jsonl")}
    ctx = StageContext(node=out.name, workdir=out.parent, cache_dir=cache, progress=progress or NullProgress())
    return k.run(config, inputs, out, ctx)


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _tensors(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tiny_model: Callable[..., Path], corpus: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StageResult]:
    """An uninterrupted 8-step run with validation, shared by several tests."""
    root = tmp_path_factory.mktemp("ref")
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 8, "validation": {"fraction": 0.05, "every_steps": 4}}
    res = _run("continual_pretraining", cfg, tiny_model("llama"), corpus, root / "out", root / "cache")
    return root / "out", res


def test_loss_drops_and_outputs(reference_run: tuple[Path, StageResult], tiny_model: Callable[..., Path]) -> None:
    out, res = reference_run
    recs = _metrics(out)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8] and val[1]["val_loss"] < val[0]["val_loss"]
    for r in train:
        assert r["mfu"] == "n/a" and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0
    assert train[-1]["tokens"] == 8 * 4 * 32
    m = res.metrics
    assert m["final_train_loss"] == train[-1]["loss"] and m["final_val_loss"] == val[-1]["val_loss"]
    assert m["tokens"] == 1024 and m["steps"] == 8
    assert (out / res.artifacts["loss_curve"]).stat().st_size > 1000
    assert not (out / "work" / "ckpt").exists()  # checkpoints go once the model is written
    # The exported model: loads with from_pretrained, has the source dtype, and was trained.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert res.model_dir == out / "model"
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    assert next(model.parameters()).dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    assert tok.eos_token_id == 2 and GenerationConfig.from_pretrained(res.model_dir).eos_token_id == 2
    base, new = _tensors(tiny_model("llama")), _tensors(res.model_dir)
    assert base.keys() == new.keys()
    assert all(not torch.equal(base[k], new[k]) for k in base if k.endswith("proj.weight"))
    # It predicts the corpus better than the base does.
    ids = tok("w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", return_tensors="pt")["input_ids"]
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    with torch.no_grad():
        assert model(ids, labels=ids).loss < base_model(ids, labels=ids).loss


def test_rerun_after_completion_returns_result(reference_run: tuple[Path, StageResult],
                                               tiny_model: Callable[..., Path], corpus: Path) -> None:
    out, res = reference_run
    mtime = (out / "model" / "model.safetensors").stat().st_mtime_ns
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 8, "validation": {"fraction": 0.05, "every_steps": 4}}
    again = _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, out.parent / "cache")
    assert again.metrics == res.metrics
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == mtime


def test_sigterm_checkpoints_and_resume_is_bit_identical(
        reference_run: tuple[Path, StageResult], tiny_model: Callable[..., Path], corpus: Path,
        tmp_path: Path) -> None:
    ref_out, ref = reference_run
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 8, "validation": {"fraction": 0.05, "every_steps": 4}}
    out = tmp_path / "out"
    with pytest.raises(StageError, match="SIGTERM after step 5 of 8.*run again to resume"):
        _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, tmp_path / "cache",
             progress=SigtermAt(5))
    assert not (out / "model").exists()
    ckpts = sorted(p.name for p in (out / "work" / "ckpt").iterdir())
    assert ckpts == ["step-3", "step-5"]  # periodic at 3, on SIGTERM at 5; the newest two kept
    assert json.loads((out / "work" / "ckpt" / "step-5" / "manifest.json").read_text())["data_position"] == 20
    res = _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, tmp_path / "cache")
    got, want = _metrics(out), _metrics(ref_out)
    key = ("step", "loss", "grad_norm", "lr", "val_loss", "tokens")
    assert [{k: r.get(k) for k in key} for r in got] == [{k: r.get(k) for k in key} for r in want]
    import torch

    a, b = _tensors(res.model_dir), _tensors(ref.model_dir)  # type: ignore[arg-type]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_hold_no_pickle_and_a_damaged_newest_falls_back(
        reference_run: tuple[Path, StageResult], tiny_model: Callable[..., Path], corpus: Path,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """safetensors + JSON only; a truncated newest checkpoint and a planted pickle checkpoint are
    passed over (moved aside) and training resumes from the previous one, bit-identically."""
    ref_out, ref = reference_run
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 8, "validation": {"fraction": 0.05, "every_steps": 4}}
    out = tmp_path / "out"
    with pytest.raises(StageError, match="SIGTERM after step 5"):
        _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, tmp_path / "cache",
             progress=SigtermAt(5))
    ckpt = out / "work" / "ckpt"
    names = sorted(p.name for p in (ckpt / "step-5").iterdir())
    assert names == ["manifest.json", "model-rank0.safetensors", "optim-rank0.safetensors", "rank-0.json",
                     "rng-rank0.safetensors"]
    man = json.loads((ckpt / "step-5" / "manifest.json").read_text())
    assert man["format"] == "finrecipe.checkpoint/1" and man["step"] == 5
    assert set(man["files"]) == set(names) - {"manifest.json"}
    # The newest checkpoint is cut short (a full disk, a kill during a copy)...
    f = ckpt / "step-5" / "optim-rank0.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    # ...and someone planted a newer one in the old pickle format, which must never be unpickled.
    import pickle

    class Boom:
        def __reduce__(self) -> Any:
            return (Path.touch, (tmp_path / "PWNED",))

    (ckpt / "step-7").mkdir()
    (ckpt / "step-7" / "meta.json").write_text(json.dumps({"step": 7}))
    (ckpt / "step-7" / "rng-rank0.pt").write_bytes(pickle.dumps(Boom()))
    with caplog.at_level("WARNING", logger="finrecipe.train"):
        res = _run("continual_pretraining", {**cfg, "keep_checkpoints_after_done": True}, tiny_model("llama"),
                   corpus, out, tmp_path / "cache")
    assert not (tmp_path / "PWNED").exists()
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "step-7: not resumable (no manifest.json" in msgs
    assert "step-5: not resumable (optim-rank0.safetensors: missing or truncated)" in msgs
    assert {"bad-step-5", "bad-step-7"} <= {p.name for p in ckpt.iterdir()}
    got, want = _metrics(out), _metrics(ref_out)
    key = ("step", "loss", "grad_norm", "lr", "val_loss", "tokens")
    assert [{k: r.get(k) for k in key} for r in got] == [{k: r.get(k) for k in key} for r in want]
    import torch

    a, b = _tensors(res.model_dir), _tensors(ref.model_dir)  # type: ignore[arg-type]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_content_must_match_its_manifest(tiny_model: Callable[..., Path], corpus: Path,
                                                    tmp_path: Path) -> None:
    """Same size, different bytes: the sha256 in the manifest catches it."""
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 4, "checkpoint_every_steps": 1}
    out = tmp_path / "out"
    with pytest.raises(StageError, match="SIGTERM after step 2"):
        _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, tmp_path / "cache",
             progress=SigtermAt(2))
    f = out / "work" / "ckpt" / "step-2" / "model-rank0.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    from finrecipe.train.checkpoint import BadCheckpoint, Checkpointer
    from finrecipe.train.distributed import Dist

    with pytest.raises(BadCheckpoint, match="does not match its sha256"):
        Checkpointer(out / "work", Dist())._verify(out / "work" / "ckpt" / "step-2")
    Checkpointer(out / "work", Dist())._verify(out / "work" / "ckpt" / "step-1")


def test_sigkill_mid_run_resumes_without_replay_or_skip(
        reference_run: tuple[Path, StageResult], tiny_model: Callable[..., Path], corpus: Path,
        tmp_path: Path) -> None:
    """A subprocess is SIGKILLed after step 5 (last checkpoint: step 4); the rerun redoes step 5."""
    ref_out, _ = reference_run
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 8, "validation": {"fraction": 0.05, "every_steps": 4},
           "checkpoint_every_steps": 2}
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        import torch
        torch.set_num_threads(1)  # as this module's tests run (one_torch_thread): the same kernels' sums
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from test_train import _run
        from finrecipe.progress import NullProgress

        class Kill(NullProgress):
            def task(self, description, total=None, unit="it"):
                class T:
                    def update(self, *, completed=None, **kw):
                        if unit == "step" and completed == 5:
                            os.kill(os.getpid(), signal.SIGKILL)
                    def __enter__(self): return self
                    def __exit__(self, *a): return None
                return T()

        _run("continual_pretraining", json.loads({json.dumps(cfg)!r}), Path({str(tiny_model('llama'))!r}),
             Path({str(corpus)!r}), Path({str(out)!r}), Path({str(tmp_path / 'cache')!r}), progress=Kill())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]
    _run("continual_pretraining", cfg, tiny_model("llama"), corpus, out, tmp_path / "cache")
    # bit for bit: steps 1-5 ran in a fresh process, the rest and the reference in pytest's, with the same
    # torch settings (a fresh process that inherited ATen's scalar kernels from an environment leaked
    # by another test differed at ~1e-7: 4.8291862 vs 4.8291867 at step 1)
    got = [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(out)]
    want = [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(ref_out)]
    assert got == want


@pytest.mark.slow
def test_torchrun_fsdp2_two_processes_match_single(tiny_model: Callable[..., Path], corpus: Path,
                                                   tmp_path: Path) -> None:
    base = {**BASE_CFG, "max_tokens": 32 * 4 * 6, "validation": {"fraction": 0.05}}
    single = _run("continual_pretraining", {**base, "grad_accum": 2}, tiny_model("llama"), corpus,
                  tmp_path / "single", tmp_path / "cache")
    # The same recipe: the global batch (4 sequences) does not grow with the processes; each of
    # the two runs one micro-batch of 2 where the single process accumulates two.
    dist = _run("continual_pretraining",
                {**base, "grad_accum": 2, "launch": {"nproc_per_node": 2, "master_port": free_port()}},
                tiny_model("llama"), corpus, tmp_path / "fsdp", tmp_path / "cache")
    assert dist.metrics["world_size"] == 2 and single.metrics["world_size"] == 1
    assert dist.metrics["global_batch_tokens"] == single.metrics["global_batch_tokens"] == 4 * 32
    a = [r for r in _metrics(tmp_path / "single") if "loss" in r]
    b = [r for r in _metrics(tmp_path / "fsdp") if "loss" in r]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    assert dist.metrics["final_val_loss"] == pytest.approx(single.metrics["final_val_loss"], rel=1e-4)
    import torch

    ta, tb = _tensors(tmp_path / "single" / "model"), _tensors(tmp_path / "fsdp" / "model")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-3, atol=1e-5)


def test_finetune_bf16_source_and_merge(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    import torch

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"w{3 + i % 10} w{13 + i % 7}", "a": f"w{40 + i % 10}"}) + "\n"
                            for i in range(64)))
    cfg = {**BASE_CFG, "seq_len": 16, "epochs": 1, "prompt_field": "q", "response_field": "a",
           "template": "w90 {prompt} w91", "packing": False, "dtype": "float32"}
    src = tiny_model("llama", "bfloat16")
    res = _run("finetune", cfg, src, data, tmp_path / "ft", tmp_path / "cache")
    recs = [r for r in _metrics(tmp_path / "ft") if "loss" in r]
    assert len(recs) == 16 and recs[-1]["loss"] < recs[0]["loss"]
    # Padded rows: prompt (4 tokens incl. the template words) and padding are not targets.
    assert all(r["target_tokens"] == 4 * 2 for r in recs)  # 4 rows × (answer + EOS)
    out = _tensors(res.model_dir)  # type: ignore[arg-type]
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert json.loads((res.model_dir / "config.json").read_text())["dtype"] == "bfloat16"  # type: ignore[operator]
    # The fine-tuned model is a valid input to a merge: base + (finetuned − base).
    from finrecipe.merge.config import MergeConfig
    from finrecipe.merge.run import run_merge

    mcfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "base",
                                  "models": [{"model": "ft", "parameters": {"weight": 1.0}}],
                                  "dtype": "float32", "out_dtype": "bfloat16"})
    merged = run_merge(mcfg, tmp_path / "merged", {"base": src, "ft": res.model_dir})  # type: ignore[dict-item]
    mt = _tensors(merged.out_dir)
    for k in out:
        torch.testing.assert_close(mt[k].float(), out[k].float(), rtol=0.02, atol=1e-2)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged.out_dir) is not None


def test_activation_checkpointing_same_losses(tiny_model: Callable[..., Path], corpus: Path,
                                              tmp_path: Path) -> None:
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 3, "checkpoint_every_steps": None}
    _run("continual_pretraining", cfg, tiny_model("llama"), corpus, tmp_path / "a", tmp_path / "cache")
    _run("continual_pretraining", {**cfg, "activation_checkpointing": True}, tiny_model("llama"), corpus,
         tmp_path / "b", tmp_path / "cache")
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert len(a) == 3 and not (tmp_path / "a" / "work" / "ckpt").exists()
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


def test_config_errors(tiny_model: Callable[..., Path], corpus: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    k = get_kind("continual_pretraining")
    with pytest.raises(ValidationError, match="learning_rate"):
        k.Config.model_validate({**BASE_CFG, "learning_rate": 1.0})
    with pytest.raises(ValidationError, match="not both"):
        k.Config.model_validate({**BASE_CFG, "epochs": 1, "max_tokens": 100})
    with pytest.raises(ConfigError, match="global_batch_tokens=100 must be a multiple of seq_len=32"):
        _run("continual_pretraining", {**BASE_CFG, "grad_accum": None, "global_batch_tokens": 100},
             tiny_model("llama"), corpus, tmp_path / "o", tmp_path / "cache")
    assert list(k.inputs(k.Config.model_validate(
        {**BASE_CFG, "datasets": {"corpus": 1.0, "replay": 0.2}, "validation": {"datasets": ["heldout"]}}))) == [
        ("base", "model"), ("corpus", "dataset"), ("replay", "dataset"), ("heldout", "dataset")]
    est = k.estimate_output_bytes(k.Config.model_validate(BASE_CFG), {"base": ModelRef("base", tiny_model("llama"))})
    assert est == (tiny_model("llama") / "model.safetensors").stat().st_size


def test_stage_modules_do_not_import_torch() -> None:
    code = ("import sys, finrecipe.stages.continual_pretraining, finrecipe.stages.finetune, "
            "finrecipe.train.runner; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_tied_embeddings_export_stores_them_once(tiny_model: Callable[..., Path], corpus: Path,
                                                 tmp_path: Path) -> None:
    """A model with tied input/output embeddings (like the demo's) is exported as it came: one
    embedding tensor, no lm_head.weight, so a merge with its base sees the same tensor names."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "tied"
    shutil.copytree(tiny_model("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "model.safetensors"))
    sd.pop("lm_head.weight")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    res = _run("continual_pretraining", {**BASE_CFG, "max_tokens": 32 * 4 * 2}, src, corpus, tmp_path / "out",
               tmp_path / "cache")
    out = _tensors(res.model_dir)  # type: ignore[arg-type]
    assert set(out) == set(sd)
    from finrecipe.merge.config import MergeConfig
    from finrecipe.merge.run import run_merge

    mcfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": "base",
                                  "models": [{"model": "cpt", "parameters": {"weight": 1.0}}], "dtype": "float32"})
    merged = run_merge(mcfg, tmp_path / "merged", {"base": src, "cpt": res.model_dir})  # type: ignore[dict-item]
    assert set(_tensors(merged.out_dir)) == set(sd)
