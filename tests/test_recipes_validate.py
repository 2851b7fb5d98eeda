"""`finrecipe validate` on every recipe shipped in recipes/ (offline: hub models are never fetched).

Recipes that train on a user-supplied corpus (fin.yaml and the other hub recipes) must fail with a
located message naming the path to fill while the corpus is missing, and validate once it exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from finrecipe.cli import main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))
# Recipes whose finance corpus is the user's: `datasets.finance_corpus.files` must be filled.
USER_CORPUS = {"fin.yaml", "qwen2.5-0.5b.yaml", "qwen2.5-7b.yaml"}
HUB = USER_CORPUS


def _validate(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["validate", *args])
    return res.exit_code, res.output


def test_expected_recipes_exist() -> None:
    assert {"demo.yaml", *USER_CORPUS} <= set(ALL)


@pytest.mark.parametrize("name", [n for n in ALL if n not in USER_CORPUS])
def test_self_contained_recipes_validate(name: str) -> None:
    code, out = _validate(str(RECIPES / name))
    assert code == 0, out
    assert out.startswith("ok ")


@pytest.mark.parametrize("name", sorted(USER_CORPUS))
def test_missing_user_corpus_is_a_located_error(name: str, tmp_path: Path) -> None:
    code, out = _validate(str(RECIPES / name))
    if (RECIPES / "user_data" / "finance").is_dir():
        pytest.skip("a user corpus is present in recipes/user_data/finance")
    assert code == 2, out
    text = " ".join(out.split())
    assert f"{name}:" in text and "datasets.finance_corpus.files" in text
    assert "user_data/finance/*.jsonl" in text
    # the dataset's description says what to put there
    assert "expected: your" in text and "JSONL" in text and "\"text\" field" in text
    assert "user_data/finance/" in text.split("expected:")[1]


@pytest.mark.parametrize("name", sorted(USER_CORPUS))
def test_user_recipes_validate_with_a_corpus(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "fin"
    corpus.mkdir()
    (corpus / "part-0.jsonl").write_text(json.dumps({"text": "a finance document"}) + "\n")
    code, out = _validate(str(RECIPES / name), "--set", f"datasets.finance_corpus.files={corpus}/*.jsonl")
    assert code == 0, out
    assert "fin_cpt" in out and "fin_instruct" in out


def test_validation_needs_no_network_or_download(tmp_path: Path) -> None:
    """In a fresh process with the hub disabled and an empty HF cache, validation still succeeds."""
    corpus = tmp_path / "fin"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "x"}\n')
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    for name in sorted(HUB):
        r = subprocess.run([sys.executable, "-c", "from finrecipe.cli import main; main()", "validate", str(RECIPES / name),
                            "--set", f"datasets.finance_corpus.files={corpus}/*.jsonl"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_paper_recipe_settings() -> None:
    """fin.yaml carries the paper's settings (Hirano & Imajo 2024)."""
    from finrecipe.recipe import load_recipe

    r = load_recipe(RECIPES / "fin.yaml")
    s = r.schema
    models = {n: r.nodes[n].config for n in s.models}  # each source's validated config
    assert r.nodes["base"].kind.type == "hub" and models["base"].hub == "rinna/nekomata-14b"
    assert models["instruct"].hub == "rinna/nekomata-14b-instruction"
    assert all(m.revision for m in models.values())
    cpt = s.stages["fin_cpt"]
    assert (cpt["type"], cpt["model"], cpt["seq_len"], cpt["epochs"], cpt["dtype"]) == (
        "continual_pretraining", "base", 2048, 5, "bfloat16")
    assert cpt["optimizer"]["lr"] == pytest.approx(5e-7)
    merge = s.stages["fin_instruct"]
    assert merge["merge_method"] == "task_arithmetic" and merge["base_model"] == "base"
    assert [(m["model"], m["parameters"]["weight"]) for m in merge["models"]] == [
        ("instruct", 1.0), ("fin_cpt", 1.0)]
    ev = s.stages["eval"]
    assert set(ev["models"]) == {"base", "instruct", "fin_cpt", "fin_instruct"}
    assert ev["tasks"][0]["suite"] == "jfin" and ev["tasks"][0]["versions"] == ["0.2.1"]


def test_multi_gpu_recipe_has_launch_settings() -> None:
    from finrecipe.recipe import load_recipe

    s = load_recipe(RECIPES / "qwen2.5-7b.yaml").schema
    assert s.stages["fin_cpt"]["launch"]["nproc_per_node"] > 1


LOCKS = sorted(p.name for p in RECIPES.glob("*.yaml.lock"))


def _leaves(obj: object, path: str = "") -> list[tuple[str, object]]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _leaves(v, f"{path}[{i}]")]
    return [(path, obj)]


def test_demo_lockfile_is_committed() -> None:
    assert "demo.yaml.lock" in LOCKS


@pytest.mark.parametrize("name", LOCKS)
def test_committed_lockfiles_are_current_and_portable(name: str, tmp_path: Path) -> None:
    """A committed lockfile holds nothing machine- or run-specific (no absolute paths, no timestamps,
    only relative paths inside the repository), and the recipe still resolves exactly as it says."""
    import yaml

    lock_file = RECIPES / name
    before = lock_file.read_bytes()
    doc = yaml.safe_load(before)
    assert set(doc) == {"finrecipe_version", "recipe", "models", "datasets"}
    for where, v in _leaves(doc):
        if isinstance(v, str) and where.endswith(".path"):
            assert not Path(v).is_absolute() and (RECIPES / v).resolve().is_relative_to(RECIPES.parent), where
        assert not (isinstance(v, str) and v.startswith("/")), (where, v)
        assert not where.endswith(("time", "finished", "started", "date", "mtime")), where
    recipe = str(RECIPES / name.removesuffix(".lock"))
    res = CliRunner().invoke(main, ["apply", recipe, "--dry-run", "--locked", "--set",
                                    f"workdir={tmp_path / 'run'}"])
    assert res.exit_code == 0, res.output
    assert lock_file.read_bytes() == before
