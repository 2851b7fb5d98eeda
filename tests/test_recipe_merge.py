"""The merge stage through the recipe engine: recipes/merge_tiny.yaml end to end (a merge graph on
tiny `init:` models), and merge configs checked against local models' headers by `validate`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import load_state_dict
from finrecipe import load_recipe
from finrecipe.cli import main
from finrecipe.errors import FinrecipeError, RecipeError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipes/merge_tiny.yaml (+ its assets) copied elsewhere and applied once with the CLI."""
    d = tmp_path_factory.mktemp("merge_tiny")
    shutil.copy(REPO / "recipes" / "merge_tiny.yaml", d / "merge_tiny.yaml")
    shutil.copytree(REPO / "recipes" / "assets", d / "assets")
    res = CliRunner().invoke(main, ["apply", "-q", str(d / "merge_tiny.yaml")])
    assert res.exit_code == 0, res.output
    return d


def _model_dirs(d: Path) -> dict[str, Path]:
    run = json.loads((d / "runs" / "merge_tiny" / "run.json").read_text())
    return {n["name"]: Path(n["model_dir"]) for n in run["nodes"]}


def test_merge_graph_runs_end_to_end(tiny_project: Path) -> None:
    import torch

    dirs = _model_dirs(tiny_project)
    run = json.loads((tiny_project / "runs" / "merge_tiny" / "run.json").read_text())
    assert [(n["name"], n["status"]) for n in run["nodes"]] == [
        ("base", "ran"), ("instruct", "ran"), ("domain", "ran"),
        ("domain_instruct", "ran"), ("ties_blend", "ran"), ("final", "ran")]
    assert run["nodes"][5]["inputs"] == ["domain_instruct", "ties_blend"]
    sd = {k: load_state_dict(v) for k, v in dirs.items()}
    # init models differ by seed but share shapes; the tokenizer was copied from the assets
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd["base"][name], sd["instruct"][name])
    assert (dirs["instruct"] / "tokenizer.json").is_file()
    # task arithmetic: base + (instruct - base) + (domain - base)
    for k, b in sd["base"].items():
        want = b + (sd["instruct"][k] - b) + (sd["domain"][k] - b)
        torch.testing.assert_close(sd["domain_instruct"][k], want, rtol=1e-5, atol=1e-6)
        # linear with weights 0.7 / 0.3 (normalised) of two merges
        want_final = 0.7 * sd["domain_instruct"][k] + 0.3 * sd["ties_blend"][k]
        torch.testing.assert_close(sd["final"][k], want_final, rtol=1e-5, atol=1e-6)
    # the final merge is a loadable Hugging Face model with a tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(dirs["final"])
    tok = AutoTokenizer.from_pretrained(dirs["final"])
    ids = tok("the market rate", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 128
    assert (tiny_project / "runs" / "merge_tiny" / "report.md").is_file()
    assert (tiny_project / "merge_tiny.yaml.lock").is_file()


def test_reapply_is_a_noop_without_importing_torch(tiny_project: Path) -> None:
    code = textwrap.dedent("""\
        import sys
        from finrecipe import load_recipe
        res = load_recipe(sys.argv[1]).apply()
        print(res.noop, len(res.cached), "torch" in sys.modules, "transformers" in sys.modules)
        """)
    out = subprocess.run([sys.executable, "-c", code, str(tiny_project / "merge_tiny.yaml")], check=True,
                         capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONHASHSEED": "7"})
    assert out.stdout.split() == ["True", "6", "False", "False"]
    res = CliRunner().invoke(main, ["apply", str(tiny_project / "merge_tiny.yaml")])
    assert res.exit_code == 0 and "nothing to do" in res.output


def test_changing_a_merge_parameter_reruns_that_merge_and_downstream(tiny_project: Path,
                                                                    tmp_path: Path) -> None:
    proj = tmp_path / "copy"
    shutil.copytree(tiny_project, proj)  # keep the module fixture untouched
    over = ["stages.ties_blend.models.0.parameters.density=0.75"]
    plan = load_recipe(proj / "merge_tiny.yaml", overrides=over).plan()
    st = {n.name: n.status for n in plan.nodes}
    assert st == {"base": "cached", "instruct": "cached", "domain": "cached",
                  "domain_instruct": "cached", "ties_blend": "stale", "final": "stale"}
    reasons = {n.name: n.reasons for n in plan.nodes}
    assert reasons["ties_blend"] == ["config merge.models[0].parameters.density: 0.5 → 0.75"]
    res = load_recipe(proj / "merge_tiny.yaml", overrides=over).apply()
    assert res.ran == ["ties_blend", "final"]
    res = CliRunner().invoke(main, ["plan", "--json", str(proj / "merge_tiny.yaml")])
    assert res.exit_code == 0
    assert [n["status"] for n in json.loads(res.output)["nodes"]] == ["cached"] * 6


def _local_recipe(d: Path, models: dict[str, Path], stage: str) -> Path:
    lines = ["finrecipe: 1", "name: local", "models:"]
    lines += [f"  {k}: {{path: {v}}}" for k, v in models.items()]
    lines += ["datasets:", "  corpus: {files: data.txt}", "stages:", textwrap.indent(textwrap.dedent(stage), "  ")]
    (d / "data.txt").write_text("hello\n")
    p = d / "local.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_validate_checks_merge_config_against_local_headers(
        tmp_path: Path, related_models: Callable[..., dict[str, Path]],
        tiny_model: Callable[..., Path]) -> None:
    rel = related_models("llama", n=2)
    good = """\
        m:
          type: merge
          merge_method: ties
          base_model: base
          models:
            - model: m1
              parameters: {weight: 1.0, density: 0.5}
            - model: m2
              parameters: {weight: 1.0, density: 0.5}
        """
    p = _local_recipe(tmp_path, {"base": rel["base"], "m1": rel["m1"], "m2": rel["m2"]}, good)
    r = load_recipe(p)
    assert r.validate() == ["m: merge config checked against base, m1, m2"]
    est = {n.name: n.estimated_bytes for n in r.plan().nodes}
    assert est["m"] is not None and est["m"] > 0
    res = CliRunner().invoke(main, ["validate", str(p)])
    assert res.exit_code == 0 and "checked" in res.output
    # an architecture that does not match: found by `validate`, before anything runs
    p = _local_recipe(tmp_path, {"base": rel["base"], "m1": rel["m1"], "m2": tiny_model("gpt_neox")}, good)
    with pytest.raises(FinrecipeError) as ei:
        load_recipe(p).validate()
    assert "m2" in str(ei.value) or "stages.m" in str(ei.value)
    # merge keys are checked strictly, located in the recipe file
    p = _local_recipe(tmp_path, {"base": rel["base"], "m1": rel["m1"]},
                      good.replace("merge_method: ties", "merge_methd: ties").replace("m2", "m1"))
    with pytest.raises(RecipeError) as ei2:
        load_recipe(p)
    assert ei2.value.path == "stages.m.merge_methd" and ei2.value.line == 11 and ei2.value.column == 5
    assert "did you mean 'merge_method'?" in ei2.value.message
    # recipe names in the merge config are references: dangling and kind mismatches are errors
    p = _local_recipe(tmp_path, {"base": rel["base"], "m1": rel["m1"], "m2": rel["m2"]},
                      good.replace("model: m2", "model: m22"))
    with pytest.raises(RecipeError) as ei2:
        load_recipe(p)
    assert ei2.value.path == "stages.m.models[1].model" and (ei2.value.line, ei2.value.column) == (17, 9)
    assert "unknown model 'm22' (did you mean 'm2'?)" in ei2.value.message
    p = _local_recipe(tmp_path, {"base": rel["base"], "m1": rel["m1"]}, good.replace("model: m2", "model: corpus"))
    with pytest.raises(RecipeError, match="'corpus' is a dataset") as ei2:
        load_recipe(p)
    assert ei2.value.line == 16
    # stage-level keys of the merge kind
    p = _local_recipe(tmp_path, {"base": rel["base"], "m1": rel["m1"], "m2": rel["m2"]},
                      good + "  threads: -1\n")
    with pytest.raises(RecipeError) as ei2:
        load_recipe(p)
    assert ei2.value.path == "stages.m.threads"
