"""docs/extending.md, "Adding a stage kind" and "Adding a source kind": their code blocks, run as
written, through a recipe."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _code(section: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1, f"{section}: exactly one python example"
    return blocks[0]


@pytest.fixture()
def plugin(tmp_path: Path) -> Iterator[Callable[[str, str], ModuleType]]:
    from finrecipe import node

    sys.path.insert(0, str(tmp_path))
    names: list[str] = []

    def load(section: str, modname: str) -> ModuleType:
        (tmp_path / f"{modname}.py").write_text(_code(section), encoding="utf-8")
        names.append(modname)
        return importlib.import_module(modname)

    try:
        yield load
    finally:
        sys.path.remove(str(tmp_path))
        for k in [k for k, v in node.REGISTRY.items() if type(v).__module__ in names]:
            del node.REGISTRY[k]
        for n in names:
            sys.modules.pop(n, None)


def test_documented_stage_kind(plugin: Callable[[str, str], ModuleType], tiny_model: Callable[..., Path],
                               tmp_path: Path) -> None:
    import torch

    from conftest import load_state_dict
    from finrecipe import load_recipe

    plugin("Adding a stage kind", "scale_kind")
    (tmp_path / "r.yaml").write_text(
        f"finrecipe: 1\nname: s\nmodels:\n  base: {{path: {tiny_model('llama')}}}\n"
        "stages:\n  half: {type: scale, model: base, factor: 0.5}\n"
        "  back:\n    type: merge\n    merge_method: linear\n    models: [{model: half, parameters: {weight: 2.0}}]\n"
        "    parameters: {normalize: false}\n    dtype: float32\n")
    res = load_recipe(tmp_path / "r.yaml").apply()
    assert res.ran == ["half", "back"]
    half = {n.name: n for n in res.nodes}["half"]
    assert half.metrics == {"factor": 0.5}
    want, got = load_state_dict(tiny_model("llama")), load_state_dict(res.nodes[-1].model_dir)
    assert all(torch.allclose(got[k], want[k]) for k in want)  # 2 × (0.5 × w) through the merge stage
    assert load_recipe(tmp_path / "r.yaml").apply().noop
    with pytest.raises(Exception, match="greater than 0"):
        load_recipe(tmp_path / "r.yaml", overrides=["stages.half.factor=0"])


def test_documented_source_kind(plugin: Callable[[str, str], ModuleType], tmp_path: Path) -> None:
    import test_recipe_fakes  # noqa: F401  (fake_concat reads datasets' hashes)
    from finrecipe import load_recipe
    from finrecipe.errors import RecipeError

    plugin("Adding a source kind", "txt_dir_kind")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first report")
    (tmp_path / "docs" / "b.txt").write_text("second report")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.txt").write_text("w")
    (tmp_path / "r.yaml").write_text(
        "finrecipe: 1\nname: t\nmodels:\n  base: {path: m}\ndatasets:\n  reports: {txt_dir: docs}\n"
        "stages:\n  cpt: {type: fake_concat, models: [base], datasets: [reports]}\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert r.nodes["reports"].kind.type == "txt_dir" and r.order == ["base", "reports", "cpt"]
    assert r.apply().ran == ["cpt"]
    assert load_recipe(tmp_path / "r.yaml").apply().noop
    (tmp_path / "docs" / "b.txt").write_text("second report, revised")
    assert load_recipe(tmp_path / "r.yaml").apply().ran == ["cpt"]  # content-keyed
    assert "txt_dir" in (tmp_path / "r.yaml.lock").read_text()
    (tmp_path / "bad.yaml").write_text((tmp_path / "r.yaml").read_text().replace("txt_dir: docs", "txt_dir: nope"))
    with pytest.raises(RecipeError, match="no \\*.txt files"):
        load_recipe(tmp_path / "bad.yaml").plan()


def test_documented_merge_method(tmp_path: Path, related_models: Callable[..., dict[str, Path]]) -> None:
    import torch
    import yaml

    from conftest import load_state_dict
    from finrecipe.merge import load_merge_config, methods, run_merge

    code = _code("Adding a merge method")
    saved = dict(methods.METHODS)
    try:
        exec(compile(code, "extending.md", "exec"), {})
        assert "average" in methods.METHODS
        m = related_models("llama", n=2)
        a, b = m["m1"], m["m2"]
        out = {}
        for name, cfg in (("avg", {"merge_method": "average", "models": [{"model": "a"}, {"model": "b"}]}),
                          ("lin", {"merge_method": "linear", "models": [
                              {"model": "a", "parameters": {"weight": 1.0}},
                              {"model": "b", "parameters": {"weight": 1.0}}]})):
            cfg["dtype"] = "float32"
            p = tmp_path / f"{name}.yaml"
            p.write_text(yaml.safe_dump(cfg))
            run_merge(load_merge_config(p), tmp_path / name, model_paths={"a": a, "b": b})
            out[name] = load_state_dict(tmp_path / name)
        assert all(torch.equal(out["avg"][k], out["lin"][k]) for k in out["lin"])
    finally:
        methods.METHODS.clear()
        methods.METHODS.update(saved)
