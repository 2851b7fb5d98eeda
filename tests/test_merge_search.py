"""The merge_search stage and its search package: in-memory trials merge what the core writes,
strategies are deterministic and find a constructed optimum, the selection rule, trial scores equal
an independent merge-to-disk + evaluation, re-running reuses trials, protected suites are refused."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import load_state_dict

DOMAIN = ["w10 w11 w12 w13 w14 w15 w16 w17", "w20 w21 w22 w23 w24 w25", "w10 w11 w12 w20 w21 w22",
          "w30 w31 w32 w33 w10 w11", "w14 w15 w16 w17 w30 w31"]
PROMPTS = ["w60 w61 w62", "w63 w64", "w65 w66 w67", "w60 w64 w66", "w61 w63 w65"]


def _train(model_dir: Path, texts: list[str], out: Path, steps: int, lr: float, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(b) for b in batch)
    ids = torch.tensor([b + [tok.eos_token_id] * (width - len(b)) for b in batch])
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def trio(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (tiny llama), instruct (taught to answer PROMPTS), finance (taught DOMAIN prose)."""
    root = tmp_path_factory.mktemp("search_trio")
    base = tiny_model("llama")
    instruct = _train(base, [p + " w70 w71 w72" for p in PROMPTS], root / "instruct", 25, 3e-3, 1)
    finance = _train(base, DOMAIN * 2, root / "finance", 25, 3e-3, 2)
    return {"base": base, "instruct": instruct, "finance": finance}


# ----------------------------------------------------------------------------- fast merge

@pytest.mark.parametrize("method,params,top,how", [
    ("task_arithmetic", {}, {}, "memory"),
    ("task_arithmetic", {"weight": [0.4, 1.3]}, {"parameters": {"normalize": True, "lambda": 0.7}}, "memory"),
    ("ties", {"density": 0.4}, {}, "memory"),
    ("ties", {"density": [0.2, 0.9]}, {"out_dtype": "bfloat16", "parameters": {"normalize": False, "lambda": 1.2}},
     "memory"),
    ("ties", {"density": 0.001}, {}, "memory"),  # at least one element per tensor is kept
    ("ties", {"density": 0.5}, {"dtype": "bfloat16"}, "core"),  # bf16 compute: the core's own kernel
    ("dare_ties", {"density": 0.6}, {}, "core"),
])
@pytest.mark.parametrize("keep", [True, False])
def test_in_memory_merge_equals_the_core(trio: dict[str, Path], tmp_path: Path, method: str,
                                         params: dict[str, Any], top: dict[str, Any], how: str, keep: bool) -> None:
    """Bit for bit: a trial merged into the loaded float32 model is what `finrecipe merge` writes."""
    import torch
    from transformers import AutoModelForCausalLM

    from finrecipe.merge import MergeConfig, run_merge
    from finrecipe.search.fastmerge import InMemoryMerger

    cfg = {"merge_method": method, "base_model": "base", "dtype": "float32", **top,
           "models": [{"model": "instruct", "parameters": {"weight": 1.3, **params}},
                      {"model": "finance", "parameters": {"weight": 0.7, "density": 0.6} if "density" in params
                       else {"weight": 0.7}}]}
    run_merge(MergeConfig.from_dict(cfg), tmp_path / "disk", trio, seed=3)
    want = load_state_dict(tmp_path / "disk")
    model = AutoModelForCausalLM.from_pretrained(trio["instruct"], dtype=torch.float32)
    merger = InMemoryMerger(model, trio, "base", keep_in_memory=keep)
    for _ in range(2):  # the second trial reuses the kept task vectors and sorted keys
        assert merger.apply(cfg, seed=3) == how
        got = model.state_dict()
        bad = [k for k, v in want.items() if not torch.equal(got[k], v.to(torch.float32))]
        assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}"
    assert (merger.memory_bytes() > 0) == (keep and how == "memory")
    base = load_state_dict(trio["base"])
    assert any(not torch.equal(base[k], v) for k, v in want.items())


def test_prefetched_task_vectors_are_the_lazily_read_ones(trio: dict[str, Path], tmp_path: Path) -> None:
    """The background read (the core's load_task_vectors) gives the same base, task vectors and
    sorted keys as reading them lazily; a model it cannot read leaves the merger reading lazily."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from finrecipe.search.fastmerge import InMemoryMerger, Prefetch

    pre = Prefetch(trio, "base", ["instruct", "finance"], sort=True)
    assert pre.wait()
    model = AutoModelForCausalLM.from_pretrained(trio["instruct"], dtype=torch.float32)
    lazy = InMemoryMerger(model, trio, "base")
    assert set(pre.base_t) == set(lazy.targets)
    for (m, t), d in pre.delta.items():
        assert torch.equal(d, lazy._delta_t(m, t)), (m, t)
        assert torch.equal(pre.base_t[t], lazy._base_t(t)), t
        want = np.sort(np.abs(d.reshape(-1).numpy()).view(np.uint32))
        assert np.array_equal(pre.keys[(m, t)], want), (m, t)
    cfg = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "instruct", "parameters": {"weight": 1.1, "density": 0.3}},
                      {"model": "finance", "parameters": {"weight": 0.8, "density": 0.5}}]}
    InMemoryMerger(model, trio, "base", prefetch=pre).apply(cfg)
    got = {k: v.clone() for k, v in model.state_dict().items()}
    lazy.apply(cfg)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    # a domain model without one of the base's tensors: that tensor is not read ahead (the merge
    # refuses the model by name); the core's reader refuses a missing tensor by name
    broken = tmp_path / "broken"
    shutil.copytree(trio["finance"], broken)
    from safetensors.torch import load_file, save_file

    from finrecipe import _core
    from finrecipe.errors import MismatchError

    sd = load_file(str(broken / "model.safetensors"))
    gone = sorted(sd)[0]
    del sd[gone]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    part = Prefetch({**trio, "finance": broken}, "base", ["instruct", "finance"], sort=False)
    assert part.wait() and gone not in part.base_t and set(part.base_t) == set(lazy.targets) - {gone}
    x = np.empty(1, np.float32)
    with pytest.raises(MismatchError, match=gone.replace(".", r"\.")):
        _core.load_task_vectors(str(trio["base"]), [str(broken)], [gone], [x], [[np.empty(1, np.float32)]])


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.4})])
def test_torch_path_merges_what_the_core_writes(trio: dict[str, Path], tmp_path: Path, method: str,
                                                params: dict[str, Any]) -> None:
    """The whole-tensor torch path (GPU, or parameters that are not float32): a bfloat16 model
    holds the core's float32 merge rounded to bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    from finrecipe.merge import MergeConfig, run_merge
    from finrecipe.search.fastmerge import InMemoryMerger

    cfg = {"merge_method": method, "base_model": "base", "dtype": "float32",
           "models": [{"model": "instruct", "parameters": {"weight": 1.3, **params}},
                      {"model": "finance", "parameters": {"weight": 0.7, **params}}]}
    run_merge(MergeConfig.from_dict(cfg), tmp_path / "disk", trio, seed=3)
    want = load_state_dict(tmp_path / "disk")
    model = AutoModelForCausalLM.from_pretrained(trio["instruct"], dtype=torch.bfloat16)
    assert InMemoryMerger(model, trio, "base").apply(cfg) == "memory"
    got = model.state_dict()
    bad = [k for k, v in want.items() if not torch.equal(got[k], v.to(torch.bfloat16))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}"


def test_core_in_place_kernel_refuses_bad_buffers() -> None:
    import numpy as np

    from finrecipe import _core

    base = np.ones(8, dtype=np.float32)
    d = np.full(8, 0.5, dtype=np.float32)
    out = np.zeros(8, dtype=np.float32)
    _core.merge_into("task_arithmetic", out, base, [d], [2.0], False, 1.0, "F32")
    assert out.tolist() == [2.0] * 8
    ro = np.zeros(8, dtype=np.float32)
    ro.setflags(write=False)
    cases: list[tuple[str, Callable[[], None]]] = [
        ("read-only", lambda: _core.merge_into("task_arithmetic", ro, base, [d], [1.0], False, 1.0, "F32")),
        ("expected element type", lambda: _core.merge_into("task_arithmetic", out.astype(np.float64), base, [d],
                                                           [1.0], False, 1.0, "F32")),
        ("out has 4 elements", lambda: _core.merge_into("task_arithmetic", out[:4], base, [d], [1.0], False, 1.0,
                                                        "F32")),
        ("not C-contiguous", lambda: _core.merge_into("task_arithmetic", np.zeros(16, np.float32)[::2], base, [d],
                                                      [1.0], False, 1.0, "F32")),
        ("out overlaps base", lambda: _core.merge_into("task_arithmetic", base, base, [d], [1.0], False, 1.0, "F32")),
        ("needs sorted_keys", lambda: _core.merge_into("ties", out, base, [d], [1.0], True, 1.0, "F32",
                                                        densities=[0.5])),
        ("is not F32, BF16 or F16", lambda: _core.merge_into("task_arithmetic", out, base, [d], [1.0], False, 1.0,
                                                             "I8")),
        ("is not task_arithmetic or ties", lambda: _core.merge_into("slerp", out, base, [d], [1.0], False, 1.0,
                                                                    "F32")),
    ]
    for msg, call in cases:
        with pytest.raises(ValueError, match=msg):
            call()
    keys = np.empty(8, dtype=np.uint32)
    x = np.array([0.5, -3.0, 0.0, 2.0, -0.25, 2.0, 1.0, -2.0], dtype=np.float32)
    _core.sort_magnitudes([x], [keys])
    assert keys.tolist() == sorted((np.abs(x).view(np.uint32)).tolist())
    # TIES with density 3/8: keeps -3.0 and the first two 2.0 magnitudes (lower index first)
    _core.merge_into("ties", out, np.zeros(8, np.float32), [x], [1.0], True, 1.0, "F32", densities=[0.375],
                     sorted_keys=[keys])
    assert out.tolist() == [0.0, -3.0, 0.0, 2.0, 0.0, 2.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- strategies, rule

def _space(**kw: Any) -> Any:
    from finrecipe.search.space import SearchSpace

    return SearchSpace.model_validate({"methods": ["task_arithmetic"],
                                       "weights": {"inst": [0.0, 2.0], "dom": [0.0, 2.0]}, **kw})


def _bowl(c: Any) -> float:
    """A constructed objective: best at instruct 1.5, domain 0.5."""
    return -((c.weights["inst"] - 1.5) ** 2) - (c.weights["dom"] - 0.5) ** 2


@pytest.mark.parametrize("strategy,trials", [("grid", 25), ("random", 60), ("bayesian", 40)])
def test_strategies_find_the_constructed_optimum_deterministically(strategy: str, trials: int) -> None:
    from finrecipe.search.strategy import run_strategy

    space = _space(grid_points=5)

    def run() -> list[Any]:
        seen: list[Any] = []

        def ev(c: Any) -> tuple[float, float]:
            seen.append(c)
            return _bowl(c), 0.0

        run_strategy(strategy, space, "inst", ["dom"], trials, 7, ev)  # type: ignore[arg-type]
        return seen

    a, b = run(), run()
    assert [c.to_json() for c in a] == [c.to_json() for c in b]  # same seed, same candidates
    assert len(a) == trials
    best = max(a, key=_bowl)
    if strategy == "grid":
        assert best.weights == {"inst": 1.5, "dom": 0.5}
    else:
        assert _bowl(best) > -0.05, best
    for c in a:
        assert 0.0 <= c.weights["inst"] <= 2.0 and 0.0 <= c.weights["dom"] <= 2.0


def test_grid_enumerates_methods_densities_and_layer_groups() -> None:
    from finrecipe.search.space import grid, grid_size

    space = _space(methods=["task_arithmetic", "ties"], grid_points=2, layer_groups=2, density=[0.5, 1.0])
    cands = list(grid(space, "inst", ["dom"]))
    assert len(cands) == grid_size(space, "inst", ["dom"]) == 16 + 32
    assert {c.method for c in cands} == {"task_arithmetic", "ties"}
    assert all(c.density is None for c in cands if c.method == "task_arithmetic")
    assert {c.density for c in cands if c.method == "ties"} == {0.5, 1.0}
    assert all(isinstance(c.weights["inst"], tuple) and len(c.weights["inst"]) == 2 for c in cands)
    cfg = cands[1].merge_config("base")
    assert cfg["models"][0]["parameters"]["weight"] == list(cands[1].weights["inst"])  # a mergekit gradient


def test_selection_rules() -> None:
    from finrecipe.search.objective import Scores, SelectRule, select

    trials = [("a", Scores(0.50, agreement=0.80)), ("b", Scores(0.60, agreement=0.95)),
              ("c", Scores(0.55, agreement=0.91)), ("d", Scores(0.70, agreement=1.0))]
    assert select(trials, SelectRule(rule="constrained", min_agreement=0.9)) == ("c", True)
    assert select(trials, SelectRule(rule="constrained", min_agreement=0.99)) == ("d", True)
    # nobody meets it: the most agreeable one, and the constraint is reported as not met
    assert select(trials[:3], SelectRule(rule="constrained", min_agreement=0.99)) == ("b", False)
    # weighted: -bpb + 1·agreement → a: 0.30, b: 0.35, c: 0.36, d: 0.30
    assert select(trials, SelectRule(rule="weighted"))[0] == "c"
    assert select(trials, SelectRule(rule="weighted", weights={"domain": 1.0, "instruction": 0.0}))[0] == "a"


def test_holdout_split_is_by_document_and_order_independent() -> None:
    from finrecipe.search.objective import split_documents

    docs = [f"document number {i} about bonds" for i in range(400)]
    kept, held = split_documents(docs, 0.1)
    assert 20 < len(held) < 60 and len(kept) + len(held) == 400
    kept2, held2 = split_documents(list(reversed(docs)), 0.1)
    assert sorted(held2) == sorted(held) and not set(held) & set(kept)


# ----------------------------------------------------------------------------- the stage

def _recipe(d: Path, trio: dict[str, Path], body: str, protected: str = "") -> Path:
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "data" / "dev.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOMAIN))
    (d / "data" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (d / "data" / "exam.jsonl").write_text(json.dumps({"question": "w10 w11", "choices": ["w12", "w40"],
                                                       "answer": 0}) + "\n")
    text = textwrap.dedent(f"""\
        finrecipe: 1
        name: search_test
        {protected}
        models:
          base: {{path: {trio['base']}}}
          instruct: {{path: {trio['instruct']}}}
          finance: {{path: {trio['finance']}}}
        datasets:
          finance_dev: {{files: data/dev.jsonl, text_field: text}}
        stages:
          searched:
            type: merge_search
            base: base
            instruct: instruct
            domains: [finance]
        """) + textwrap.indent(textwrap.dedent(body), "    ")
    p = d / "search.yaml"
    p.write_text(text)
    return p


GRID = """\
space:
  methods: [task_arithmetic]
  weights: {instruct: [0.0, 1.0], finance: [0.0, 1.0]}
  grid_points: 2
strategy: grid
objective:
  domain: {dataset: finance_dev}
  instruction: {prompts: data/prompts.jsonl, max_new_tokens: 4}
select: {rule: constrained, min_agreement: 0.5}
"""


def _independent_scores(model_dir: Path, responses: list[dict[str, Any]]) -> tuple[float, float]:
    """bits/byte with the evaluation suite's perplexity (a fresh load from disk) and the mean
    log-probability of the instruct responses (a plain forward pass)."""
    import torch

    from finrecipe.eval.lm import HFLM
    from finrecipe.eval.suites.perplexity import bits_per_byte

    lm = HFLM.load(model_dir, device="cpu", dtype="float32")
    bpb = bits_per_byte(lm, DOMAIN).value
    tot, n = 0.0, 0
    with torch.inference_mode():
        for r in responses:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
            k = len(r["response_ids"])
            tgt = ids[0, -k:]
            tot += float(logp[-k:].gather(1, tgt.unsqueeze(1)).sum())
            n += k
    return bpb, tot / n


def test_search_stage_end_to_end(trio: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from finrecipe import load_recipe
    from finrecipe.merge import MergeConfig, run_merge

    path = _recipe(tmp_path, trio, GRID)
    res = load_recipe(path).apply()
    run = json.loads((tmp_path / "runs" / "search_test" / "run.json").read_text())
    node = next(n for n in run["nodes"] if n["name"] == "searched")
    out = Path(node["model_dir"]).parent
    rows = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    # the grid's (1, 1) point is the fixed 1.0/1.0 merge: listed once
    assert [r["role"] for r in rows] == ["instruct", "fixed", "search", "search", "search"]
    for f in ("trials.csv", "trials.md", "pareto.png", "selected.yaml", "responses.jsonl"):
        assert (out / f).is_file(), f
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    by = {(r["candidate"]["weights"].get("instruct"), r["candidate"]["weights"].get("finance")): r
          for r in rows if r["role"] in ("search", "fixed")}
    assert len(by) == 4
    # base + 1·(instruct − base) is the instruct model: agreement 1 (to float rounding)
    assert by[(1.0, 0.0)]["agreement"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["agreement"] == 1.0
    assert by[(0.0, 1.0)]["bits_per_byte"] < by[(1.0, 0.0)]["bits_per_byte"]  # finance knows the prose

    # every trial's scores equal an independent merge to disk + fresh evaluation
    responses = json.loads(next(tmp_path.rglob("responses/*.json")).read_text())["responses"]
    inst_bpb, inst_lp = _independent_scores(trio["instruct"], responses)
    assert rows[0]["bits_per_byte"] == pytest.approx(inst_bpb, rel=1e-5)
    indep = {}
    for key, r in by.items():
        d = tmp_path / f"disk-{key[0]}-{key[1]}"
        cfg = MergeConfig.from_dict({
            "merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
            "models": [{"model": "instruct", "parameters": {"weight": key[0]}},
                       {"model": "finance", "parameters": {"weight": key[1]}}]})
        run_merge(cfg, d, trio)
        bpb, lp = _independent_scores(d, responses)
        assert r["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
        assert r["agreement"] == pytest.approx(math.exp(lp - inst_lp), rel=1e-4)
        indep[key] = (bpb, math.exp(lp - inst_lp))
    # the selection is the rule applied to those independent scores
    pool = {k: v for k, v in indep.items() if v[1] >= 0.5}
    want = min(pool, key=lambda k: pool[k][0])
    sel = next(r for r in rows if r["selected"])
    got = (sel["candidate"]["weights"]["instruct"], sel["candidate"]["weights"]["finance"])
    assert got == want
    # the output is the merge core's own merge of the selected config
    metrics = node["metrics"] if "metrics" in node else json.loads((out / "metrics.json").read_text())
    assert metrics["selected"]["id"] == sel["id"]
    assert metrics["selection_data"]["domain"]["dataset"] == "finance_dev"
    assert metrics["protected"] == ["jfin"]
    ref = tmp_path / "ref"
    run_merge(MergeConfig.from_dict(metrics["selected"]["config"]), ref, trio)
    a, b = load_state_dict(out / "model"), load_state_dict(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res is not None

    # re-apply: nothing to do; forced: every trial comes from the trial cache
    assert load_recipe(path).apply().noop
    load_recipe(path).apply(force=["searched"])
    run2 = json.loads((tmp_path / "runs" / "search_test" / "run.json").read_text())
    m2 = next(n for n in run2["nodes"] if n["name"] == "searched")
    m2m = m2.get("metrics") or json.loads((Path(m2["model_dir"]).parent / "metrics.json").read_text())
    assert m2m["trials_reused"] == 4


def test_a_killed_search_resumes_with_its_finished_trials(trio: dict[str, Path], tmp_path: Path) -> None:
    from finrecipe import load_recipe
    from finrecipe.search import runner

    body = GRID.replace("grid_points: 2", "grid_points: 3")
    path = _recipe(tmp_path, trio, body)
    calls = {"n": 0}
    real = runner.score_model

    def dying(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 6:  # instruct, fixed, 3 search trials done; the 4th dies
            raise KeyboardInterrupt
        return real(*a, **k)

    runner.score_model = dying  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            load_recipe(path).apply()
    finally:
        runner.score_model = real  # type: ignore[assignment]
    trial_files = list(tmp_path.rglob("trials/*/*.json"))
    assert len(trial_files) == 4  # the fixed merge + 3 search trials
    load_recipe(path).apply()
    run = json.loads((tmp_path / "runs" / "search_test" / "run.json").read_text())
    node = next(n for n in run["nodes"] if n["name"] == "searched")
    m = node.get("metrics") or json.loads((Path(node["model_dir"]).parent / "metrics.json").read_text())
    # reused: the 3 finished search trials and the fixed merge (the grid's last point, (1, 1))
    assert m["trials"] == 9 and m["trials_reused"] == 4


@pytest.mark.parametrize("protected,objective,where", [
    ("", "tasks: [{suite: jfin, data_dir: /nonexistent}]", "'jfin' is protected"),
    ("protected: [jfin, exam]", "tasks: [{custom: data/exam.jsonl, name: exam}]", "'exam' is protected"),
    ("protected: [finance_dev]", "", "dataset 'finance_dev' is protected"),
])
def test_an_objective_on_a_protected_suite_is_a_located_error(trio: dict[str, Path], tmp_path: Path,
                                                               protected: str, objective: str, where: str) -> None:
    from finrecipe import load_recipe
    from finrecipe.errors import RecipeError

    body = textwrap.dedent("""\
        objective:
          domain: {dataset: finance_dev}
        """) + ("  " + objective + "\n" if objective else "")
    path = _recipe(tmp_path, trio, body, protected)
    with pytest.raises(RecipeError) as ei:
        load_recipe(path)
    msg = str(ei.value)
    assert where in msg and "never optimised on" in msg
    assert "search.yaml:" in msg and "stages.searched.objective" in msg
    assert "\n" not in msg.strip()


def test_a_grid_larger_than_the_budget_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    from finrecipe import load_recipe
    from finrecipe.errors import RecipeError

    path = _recipe(tmp_path, trio, GRID + "trials: 3\n")
    with pytest.raises(RecipeError, match="the grid has 4 candidates, more than trials: 3"):
        load_recipe(path)


def test_merge_probe_scores_the_merge_of_live_weights(trio: dict[str, Path]) -> None:
    """θ_t + W·τ_I scored from live (finance) weights equals the fixed merge scored by the search."""
    import torch
    from transformers import AutoModelForCausalLM

    from finrecipe.search.fastmerge import InMemoryMerger
    from finrecipe.search.objective import InstructionObjective, score_model
    from finrecipe.search.probe import MergeProbe

    probe = MergeProbe.load(trio["base"], trio["instruct"], weight=1.0, domain_texts=DOMAIN, prompts=PROMPTS,
                            instruction=InstructionObjective(max_new_tokens=4), device="cpu")
    live = AutoModelForCausalLM.from_pretrained(trio["finance"], dtype=torch.float32)
    got = probe.score(live.named_parameters())
    before = {k: v.clone() for k, v in live.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())  # live weights only read
    m = AutoModelForCausalLM.from_pretrained(trio["instruct"], dtype=torch.float32)
    InMemoryMerger(m, trio, "base").apply({"merge_method": "task_arithmetic", "base_model": "base",
                                            "models": [{"model": "instruct", "parameters": {"weight": 1.0}},
                                                       {"model": "finance", "parameters": {"weight": 1.0}}]})
    want = score_model(m, probe.data, pad_id=probe.pad)
    assert got.bits_per_byte == pytest.approx(want.bits_per_byte, rel=1e-5)
    assert got.agreement == pytest.approx(want.agreement, rel=1e-4)
    # W = 0: the live model itself
    probe.weight = 0.0
    alone = probe.score(live.named_parameters())
    assert alone.bits_per_byte < got.bits_per_byte  # the finance model alone knows the prose best
    # the probe's instruct reference: the instruct weights themselves agree fully
    probe.weight = 1.0
    base = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.float32)
    assert probe.score(base.named_parameters()).agreement == pytest.approx(1.0, abs=1e-4)
