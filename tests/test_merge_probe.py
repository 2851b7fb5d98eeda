"""Merge probes during continual pretraining (`merge_probe:`): every probe's scores equal the
merge search's scorer on the checkpoint of that step merged offline by the core; `keep: best`
outputs the argmax; early stop; a killed run resumes with its probe history; 2-process FSDP2
(gloo) probes what one process probes; cache keys; protected suites refused where they are written."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finrecipe.errors import StageError
from finrecipe.progress import NullProgress
from finrecipe.stages.base import DatasetRef, ModelRef, StageContext, StageResult, get_kind

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import SigtermAt, counting_corpus, free_port  # noqa: E402

# Dev prose mostly outside the training corpus's words (w3..w26): at this learning rate its bits
# per byte first fall (the model learns the format), then rise, so a middle probe is the best.
DEV = ["w40 w41 w42 w30 w31 w32 w40 w41 w42", "w33 w34 w40 w41 w42 w35"]
PROMPTS = ["w30 w31 w32", "w33 w34", "w35 w36 w37", "w30 w34 w36"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[..., Path]) -> dict[str, Path]:
    """A corpus, dev text, prompts, and an instruct twin of the tiny base (taught to answer)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("probe_data")
    corpus = counting_corpus(root / "corpus.jsonl")
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t}) + "\n" for t in DEV))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = tiny_model("llama")
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = [tok(p + " w40 w41 w42")["input_ids"] + [tok.eos_token_id] for p in PROMPTS]
    width = max(len(b) for b in batch)
    ids = torch.tensor([b + [tok.eos_token_id] * (width - len(b)) for b in batch])
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    inst = root / "instruct"
    model.save_pretrained(inst)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, inst / f.name)
    return {"base": base, "instruct": inst, "corpus": corpus, "dev": dev, "prompts": prompts}


def _probe(**kw: Any) -> dict[str, Any]:
    return {"every_steps": 2, "instruct": "instruct", "weight": 0.8,
            "objective": {"domain": {"dataset": "dev"},
                          "instruction": {"prompts": "prompts.jsonl", "max_new_tokens": 4, "chat": False}},
            **kw}


CFG: dict[str, Any] = dict(
    model="base", datasets=["corpus"], seq_len=32, micro_batch_size=2, grad_accum=2, max_tokens=32 * 4 * 8,
    optimizer=dict(lr=1e-2, weight_decay=0.01), schedule=dict(kind="cosine", warmup_steps=2),
    checkpoint_every_steps=2, keep_checkpoints=10, seed=0, device="cpu",  # scores compared with CPU float32
)


def _run(cfg: dict[str, Any], data: dict[str, Path], out: Path, progress: Any = None) -> StageResult:
    k = get_kind("continual_pretraining")
    config = k.Config.model_validate(cfg)
    inputs = {"base": ModelRef("base", data["base"]), "instruct": ModelRef("instruct", data["instruct"]),
              "corpus": DatasetRef("corpus", (data["corpus"],), "jsonl", text_field="text"),
              "dev": DatasetRef("dev", (data["dev"],), "jsonl", text_field="text")}
    ctx = StageContext(node=out.name, workdir=out.parent, cache_dir=out.parent / "cache",
                       progress=progress or NullProgress(), recipe_dir=data["prompts"].parent)
    return k.run(config, inputs, out, ctx)


def _probes(out: Path) -> list[dict[str, Any]]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "probe_bits_per_byte" in r]


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _offline_scores(data: dict[str, Path], weights: dict[str, Any], tmp: Path, weight: float) -> Any:
    """The checkpoint's weights as a model directory, merged to disk by the core
    (base + weight·(instruct − base) + (ckpt − base)), loaded, and scored by the search's scorer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from finrecipe.merge import MergeConfig, run_merge
    from finrecipe.search.objective import InstructionObjective, score_model
    from finrecipe.search.probe import MergeProbe

    m = AutoModelForCausalLM.from_pretrained(data["base"], dtype=torch.float32)
    m.load_state_dict(weights, strict=False)
    ck = tmp / "ckpt_model"
    m.save_pretrained(ck)
    for f in data["base"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, ck / f.name)
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
           "models": [{"model": "instruct", "parameters": {"weight": weight}},
                      {"model": "ckpt", "parameters": {"weight": 1.0}}]}
    run_merge(MergeConfig.from_dict(cfg), tmp / "merged", {"base": data["base"], "instruct": data["instruct"],
                                                           "ckpt": ck}, overwrite=True)
    ref = MergeProbe.load(data["base"], data["instruct"], domain_texts=DEV, prompts=PROMPTS,
                          instruction=InstructionObjective(max_new_tokens=4, chat=False), device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32)
    return score_model(merged, ref.data, pad_id=ref.pad)


@pytest.fixture(scope="module")
def last_run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StageResult]:
    out = tmp_path_factory.mktemp("probe_last") / "out"
    res = _run({**CFG, "keep_checkpoints_after_done": True, "merge_probe": _probe()}, data, out)
    return out, res


def test_probe_rows_equal_the_offline_merge_of_each_checkpoint(last_run: tuple[Path, StageResult],
                                                               data: dict[str, Path], tmp_path: Path) -> None:
    out, res = last_run
    probes = _probes(out)
    assert [p["step"] for p in probes] == [2, 4, 6, 8]
    assert all("loss" in p for p in probes)  # on the step's row, beside the loss
    assert len({round(p["probe_bits_per_byte"], 6) for p in probes}) == 4  # the weights moved
    for p in probes:
        if p["step"] < 8:
            w = _tensors(out / "work" / "ckpt" / f"step-{p['step']}" / "model-rank0.safetensors")
        else:  # the last step has no training checkpoint: the stage output holds its weights
            w = _tensors(out / "model" / "model.safetensors")
        got = _offline_scores(data, w, tmp_path / f"s{p['step']}", 0.8)
        assert p["probe_bits_per_byte"] == pytest.approx(got.bits_per_byte, rel=1e-5)
        assert p["probe_agreement"] == pytest.approx(got.agreement, rel=1e-4)
        assert p["probe_token_agreement"] == pytest.approx(got.token_agreement, abs=1e-9)
    s = res.metrics["probe"]
    assert s["probes"] == 4 and s["keep"] == "last" and res.metrics["output_step"] == 8
    assert s["selection_data"]["domain"]["dataset"] == "dev" and s["protected"] == ["jfin"]
    assert (out / "loss_curve.png").stat().st_size > 5000  # two panels


def _argmax_step(probes: list[dict[str, Any]], min_agreement: float = 0.5) -> int:
    """The constrained rule, written out: the lowest bits/byte among probes with agreement ≥
    min_agreement (the earlier on a tie)."""
    ok = [(p["probe_bits_per_byte"], i, p["step"]) for i, p in enumerate(probes)
          if p["probe_agreement"] >= min_agreement]
    return min(ok)[2]


RULE = {"rule": "constrained", "min_agreement": 0.5}


def test_keep_best_outputs_the_argmax_probe(last_run: tuple[Path, StageResult], data: dict[str, Path],
                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run({**CFG, "merge_probe": _probe(keep="best", select=RULE)}, data, out)
    probes = _probes(out)
    ref = _probes(last_run[0])  # the same training: the same probe scores
    assert [(p["step"], p["probe_bits_per_byte"]) for p in probes] == \
        [(p["step"], p["probe_bits_per_byte"]) for p in ref]
    best = _argmax_step(probes)
    assert best not in (2, 8), "the fixture should make a middle probe the best"
    assert res.metrics["output_step"] == best == res.metrics["probe"]["best_step"]
    assert probes[-1]["probe_best_step"] == best
    import torch

    got = _tensors(out / "model" / "model.safetensors")
    want = _tensors(last_run[0] / "work" / "ckpt" / f"step-{best}" / "model-rank0.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert not (out / "work" / "probe").exists()  # the kept export became model/


def test_stop_when_no_improvement(last_run: tuple[Path, StageResult], data: dict[str, Path],
                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run({**CFG, "merge_probe": _probe(keep="best", select=RULE, stop_when_no_improvement=1)},
               data, out)
    ref = _probes(last_run[0])
    # the first probe after which one probe did not improve
    stop = next(p["step"] for p in ref[1:] if _argmax_step([q for q in ref if q["step"] <= p["step"]])
                != p["step"])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in recs) == stop < 8
    m = res.metrics
    assert m["steps"] == stop and m["planned_steps"] == 8 and m["probe"]["stopped_early"]
    assert m["output_step"] == _argmax_step(ref[:stop // 2])
    # The report: a section naming the choice and the data, the probe curves beside the loss curve
    from finrecipe.report.render import images, render_markdown
    from finrecipe.report.run import NodeRecord, RunRecord

    node = NodeRecord.from_json({"name": "finance", "type": "continual_pretraining", "key": "k", "status": "ran",
                                 "out_dir": str(out), "metrics": m, "artifacts": res.artifacts})
    run = RunRecord.from_json({"recipe": {"name": "t"}, "nodes": []})
    run.nodes = [node]
    md = render_markdown(run, {})
    assert "## Merge probe: finance" in md
    assert f"the best at step {m['output_step']}" in md and f"best probed checkpoint (step {m['output_step']})" in md
    assert f"stopped early after step {stop} of 8" in md and "bits/byte on dev (2 documents)" in md
    assert "Protected (never optimised on): jfin." in md
    assert [cap for _s, cap, _p in images(run)] == ["finance: training loss and merge probe curves"]


def test_a_killed_run_resumes_with_its_probe_history(data: dict[str, Path], tmp_path: Path) -> None:
    cfg = {**CFG, "checkpoint_every_steps": 3, "merge_probe": _probe(keep="best", select=RULE)}
    ref = _run(cfg, data, tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(StageError, match="SIGTERM after step 5"):
        _run(cfg, data, out, progress=SigtermAt(5))
    man = json.loads((out / "work" / "ckpt" / "step-5" / "manifest.json").read_text())
    assert [r["step"] for r in man["probe"]["history"]] == [2, 4]
    res = _run(cfg, data, out)
    key = ("step", "loss", "probe_bits_per_byte", "probe_agreement", "probe_best_step")
    assert [{k: r.get(k) for k in key} for r in _probes(out)] == \
        [{k: r.get(k) for k in key} for r in _probes(tmp_path / "ref")]
    assert res.metrics["output_step"] == ref.metrics["output_step"]
    assert res.metrics["probe"]["probes"] == 4
    import torch

    a, b = _tensors(out / "model" / "model.safetensors"), _tensors(tmp_path / "ref" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp2_two_processes_probe_like_one(last_run: tuple[Path, StageResult], data: dict[str, Path],
                                            tmp_path: Path) -> None:
    """torchrun, 2 processes, gloo: parameters are gathered one at a time for rank 0's probe."""
    out = tmp_path / "fsdp"
    res = _run({**CFG, "merge_probe": _probe(keep="best", select=RULE),
                "launch": {"nproc_per_node": 2, "master_port": free_port(), "backend": "gloo"}}, data, out)
    assert res.metrics["world_size"] == 2
    a, b = _probes(last_run[0]), _probes(out)
    assert [p["step"] for p in b] == [2, 4, 6, 8]
    for x, y in zip(a, b, strict=True):
        assert y["probe_bits_per_byte"] == pytest.approx(x["probe_bits_per_byte"], rel=1e-4)
        assert y["probe_agreement"] == pytest.approx(x["probe_agreement"], rel=1e-3)
    assert res.metrics["probe"]["probes"] == 4
    # keep: best under FSDP2: the export of the best step (gathered by all ranks, written by rank 0)
    best = _argmax_step(b)
    assert res.metrics["output_step"] == best
    import torch

    got = _tensors(out / "model" / "model.safetensors")
    want = _tensors(last_run[0] / "work" / "ckpt" / f"step-{best}" / "model-rank0.safetensors")
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- recipe: keys, errors

RECIPE = """\
finrecipe: 1
name: probe
workdir: work
models:
  base: {{path: {base}}}
  instruct: {{path: {instruct}}}
datasets:
  corpus: {{files: {corpus}, text_field: text}}
  dev: {{files: {dev}, text_field: text}}
stages:
  cpt:
    type: continual_pretraining
    model: base
    datasets: [corpus]
    seq_len: 32
"""


def _recipe(tmp_path: Path, data: dict[str, Path], probe: str = "", top: str = "") -> Path:
    body = top + RECIPE.format(**{k: str(v) for k, v in data.items()})
    if probe:
        body += "    merge_probe:\n" + textwrap.indent(textwrap.dedent(probe), "      ")
    p = tmp_path / "r.yaml"
    p.write_text(body)
    if not (tmp_path / "prompts.jsonl").exists():
        (tmp_path / "prompts.jsonl").write_text(data["prompts"].read_text())
    return p


def _key(path: Path) -> str:
    from finrecipe import load_recipe

    r = load_recipe(path)
    return {n.name: n.key for n in r.plan().nodes}["cpt"]


PROBE_YAML = """\
every_steps: 2
instruct: instruct
objective:
  domain: {dataset: dev}
  instruction: {prompts: prompts.jsonl}
"""


def test_cache_key_follows_the_probe_settings(data: dict[str, Path], tmp_path: Path) -> None:
    from finrecipe import load_recipe

    plain = _key(_recipe(tmp_path, data))
    with_probe = _key(_recipe(tmp_path, data, PROBE_YAML))
    assert with_probe != plain
    r = load_recipe(_recipe(tmp_path, data, PROBE_YAML))
    cpt = next(n for n in r.plan().nodes if n.name == "cpt")
    assert {"instruct", "dev"} <= set(cpt.inputs)  # named inputs: built first, in the key
    variants = {
        "every_steps": PROBE_YAML.replace("every_steps: 2", "every_steps: 3"),
        "weight": PROBE_YAML + "weight: 0.5\n",
        "keep": PROBE_YAML + "keep: best\n",
        "stop": PROBE_YAML + "stop_when_no_improvement: 2\n",
        "select": PROBE_YAML + "select: {min_agreement: 0.8}\n",
    }
    keys = {k: _key(_recipe(tmp_path, data, v)) for k, v in variants.items()}
    assert len(set(keys.values()) | {with_probe, plain}) == len(keys) + 2
    assert _key(_recipe(tmp_path, data, PROBE_YAML + "batch_tokens: 1024\n")) == with_probe  # speed only
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "w30 w31"}\n')  # the prompts' content counts
    assert _key(_recipe(tmp_path, data, PROBE_YAML)) != with_probe
    assert _key(_recipe(tmp_path, data)) == plain


@pytest.mark.parametrize("probe,top,where,msg", [
    (PROBE_YAML, "protected: [dev]\n", "stages.cpt.merge_probe.objective",
     "dataset 'dev' is protected .*never optimised on"),
    (PROBE_YAML.replace("{prompts: prompts.jsonl}", "{prompts: jfin.jsonl}"), "",
     "stages.cpt.merge_probe.objective", "protected.*never optimised on"),
    (PROBE_YAML + "  tasks: [{suite: jfin, data_dir: /nonexistent}]\n", "",
     "stages.cpt.merge_probe.objective.tasks", "'jfin' is protected"),
    (PROBE_YAML + "  tasks: [{custom: prompts.jsonl, kind: multiple_choice}]\n", "",
     "stages.cpt.merge_probe.objective", "not supported by merge_probe"),
    (PROBE_YAML.replace("dataset: dev", "dataset: corpus"), "", "stages.cpt",
     "'corpus' is trained on by this stage"),
    (PROBE_YAML.replace("instruct: instruct", "instruct: base"), "", "stages.cpt",
     "must differ from the trained model"),
    (PROBE_YAML.replace("instruct: instruct", "instruct: nope"), "", "stages.cpt.merge_probe.instruct",
     "unknown model 'nope'"),
    (PROBE_YAML.replace("every_steps: 2", "every_steps: 0"), "", "stages.cpt.merge_probe.every_steps", ""),
])
def test_recipe_errors_are_located(data: dict[str, Path], tmp_path: Path, probe: str, top: str, where: str,
                                   msg: str) -> None:
    import re

    from finrecipe import load_recipe
    from finrecipe.errors import RecipeError

    with pytest.raises(RecipeError) as ei:
        load_recipe(_recipe(tmp_path, data, probe, top))
    text = str(ei.value)
    assert where in text and "r.yaml:" in text and re.search(msg, text), text
    assert "\n" not in text.strip()



def test_progress_line_shows_the_probe() -> None:
    from finrecipe.train.runner import _info

    line = _info({"step": 4, "loss": 1.25, "probe_bits_per_byte": 0.84712, "probe_agreement": 0.6756,
                  "probe_best_step": 2})
    assert line == "loss 1.2500 · probe 0.8471 bpb agr 0.676 (best @2)"
    assert _info({"step": 3, "loss": 1.0}) == "loss 1.0000"


def test_a_large_instruction_vector_is_read_per_tensor(data: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the budget τ_I is not kept but read from the memory-mapped files at each probe: the
    same scores."""
    import torch
    from transformers import AutoModelForCausalLM

    from finrecipe.search import probe as sprobe
    from finrecipe.search.objective import InstructionObjective

    live = AutoModelForCausalLM.from_pretrained(data["base"], dtype=torch.float32)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    kw: dict[str, Any] = dict(weight=0.8, domain_texts=DEV, prompts=PROMPTS, device="cpu",
                              instruction=InstructionObjective(max_new_tokens=4, chat=False))
    kept = sprobe.MergeProbe.load(data["base"], data["instruct"], **kw)
    monkeypatch.setattr(sprobe, "TAU_BUDGET_BYTES", 0)
    lazy = sprobe.MergeProbe.load(data["base"], data["instruct"], **kw)
    assert kept.tau and not lazy.tau and lazy.readers is not None
    a, b = kept.score(live.named_parameters()), lazy.score(live.named_parameters())
    assert a.bits_per_byte == b.bits_per_byte and a.agreement == b.agreement
