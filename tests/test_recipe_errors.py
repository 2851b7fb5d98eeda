"""Recipe errors: every kind names file, line, column and key path, with a suggestion where one helps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import test_recipe_fakes  # noqa: F401  (registers fake_concat / fake_eval)
from finrecipe import load_recipe
from finrecipe.cli import main
from finrecipe.errors import ConfigError, RecipeError


def _model_dir(p: Path, content: str = "w") -> Path:
    p.mkdir(parents=True, exist_ok=True)
    (p / "weights.txt").write_text(content)
    (p / "config.json").write_text("{}")
    return p


@pytest.fixture()
def rdir(tmp_path: Path) -> Path:
    _model_dir(tmp_path / "models" / "base", "base")
    _model_dir(tmp_path / "models" / "inst", "inst")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    return tmp_path


GOOD = """\
finrecipe: 1
name: t
models:
  base: {path: models/base}
  inst:
    path: models/inst
datasets:
  corpus:
    files: data/*.jsonl
stages:
  cpt:
    type: fake_concat
    models: [base]
    datasets: [corpus]
  merged:
    type: fake_concat
    models: [cpt, inst]
"""


def _write(d: Path, text: str, name: str = "r.yaml") -> Path:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def _err(path: Path, overrides: list[str] | None = None) -> RecipeError:
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, overrides=overrides or [])
    return ei.value


def test_good_recipe_loads(rdir: Path) -> None:
    r = load_recipe(_write(rdir, GOOD))
    assert r.order == ["base", "inst", "corpus", "cpt", "merged"]
    assert r.nodes["merged"].deps == ["cpt", "inst"]


def test_unknown_top_level_key_with_suggestion(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("name: t", "name: t\ndescriptoin: x"))
    e = _err(p)
    assert (e.file, e.line, e.column, e.path) == (str(p), 3, 1, "descriptoin")
    assert "did you mean 'description'?" in str(e)
    assert str(e).startswith(f"{p}:3:1: descriptoin: unknown key")


def test_unknown_key_in_model_source(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("    path: models/inst", "    pathh: models/inst"))
    e = _err(p)
    assert (e.line, e.column, e.path) == (6, 5, "models.inst.pathh")
    assert "did you mean 'path'?" in e.message


def test_unknown_key_in_stage_config(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("    datasets: [corpus]", "    datasets: [corpus]\n    vallue: 2"))
    e = _err(p)
    assert (e.line, e.column, e.path) == (15, 5, "stages.cpt.vallue")
    assert "did you mean 'value'?" in e.message


def test_wrong_type(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("    datasets: [corpus]", "    datasets: [corpus]\n    value: lots"))
    e = _err(p)
    assert (e.line, e.column, e.path) == (15, 5, "stages.cpt.value")
    assert "number" in e.message and "'lots'" in e.message


def test_missing_key(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("  merged:\n    type: fake_concat\n    models: [cpt, inst]\n",
                                  "  merged:\n    type: fake_concat\n"))
    e = _err(p)
    assert (e.line, e.column, e.path) == (15, 3, "stages.merged.models")
    assert "required key missing" in e.message


def test_missing_stage_type_and_unknown_type(rdir: Path) -> None:
    e = _err(_write(rdir, GOOD.replace("    type: fake_concat\n    models: [cpt", "    models: [cpt")))
    assert e.path == "stages.merged" and e.line == 15 and "'type' missing" in e.message
    e = _err(_write(rdir, GOOD.replace("    type: fake_concat\n    models: [cpt",
                                       "    type: fake_concatt\n    models: [cpt")))
    assert (e.line, e.column, e.path) == (16, 5, "stages.merged.type")
    assert "did you mean 'fake_concat'?" in e.message


def test_reserved_type_is_clear(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finrecipe.node as node

    monkeypatch.setitem(node.BUILTIN, ("stages", "future_kind"), "finrecipe.stages.future_kind_not_written")
    e = _err(_write(rdir, GOOD.replace("    type: fake_concat\n    models: [cpt",
                                       "    type: future_kind\n    models: [cpt")))
    assert e.path == "stages.merged.type" and "reserved but not available" in e.message


def test_dangling_reference_with_suggestion(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("models: [cpt, inst]", "models: [cpt, insta]"))
    e = _err(p)
    # the reference is the 2nd list item on line 17
    assert (e.line, e.column, e.path) == (17, 19, "stages.merged.models[1]")
    assert "unknown model 'insta'" in e.message and "did you mean 'inst'?" in e.message


def test_kind_mismatch_dataset_where_model_expected(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("models: [cpt, inst]", "models: [cpt, corpus]"))
    e = _err(p)
    assert (e.line, e.column, e.path) == (17, 19, "stages.merged.models[1]")
    assert "'corpus' is a dataset" in e.message and "a model is expected" in e.message


def test_stage_without_model_output_where_model_expected(rdir: Path) -> None:
    text = GOOD + "  ev:\n    type: fake_eval\n    model: merged\n  again:\n    type: fake_concat\n" \
                  "    models: [ev]\n"
    e = _err(_write(rdir, text))
    assert e.path == "stages.again.models[0]" and "no model output" in e.message


def test_cycle_named(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("    models: [base]\n", "    models: [merged]\n"))
    e = _err(p)
    assert "dependency cycle: cpt -> merged -> cpt" in e.message
    assert (e.line, e.path) == (13, "stages.cpt.models[0]")


def test_duplicate_name_across_sections(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("  merged:", "  corpus:"))
    e = _err(p)
    assert e.path == "stages.corpus" and e.line == 15 and "one namespace" in e.message


def test_yaml_syntax_error(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("models: [cpt, inst]", "models: [cpt, inst"))
    e = _err(p)
    assert e.file == str(p) and e.line is not None and e.line >= 17 and "invalid YAML" in e.message


def test_duplicate_key(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("    datasets: [corpus]", "    datasets: [corpus]\n    models: [inst]"))
    e = _err(p)
    assert (e.line, e.column) == (15, 5) and "duplicate key 'models'" in e.message


def test_model_source_needs_exactly_one(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("  base: {path: models/base}", "  base: {path: models/base, hub: a/b}"))
    e = _err(p)
    assert (e.line, e.path) == (4, "models.base") and "exactly one of" in e.message


def test_schema_version(rdir: Path) -> None:
    e = _err(_write(rdir, GOOD.replace("finrecipe: 1", "finrecipe: 2")))
    assert (e.line, e.column, e.path) == (1, 1, "finrecipe")


def test_bad_set_paths(rdir: Path) -> None:
    p = _write(rdir, GOOD)
    e = _err(p, ["stages.cpt.vallue=3"])
    assert e.file == "--set stages.cpt.vallue=3" and e.line is None and e.path == "stages.cpt.vallue"
    assert "did you mean 'value'?" in e.message
    e = _err(p, ["stages.cptt.value=3"])
    assert "no stage named 'cptt'" in e.message and "did you mean 'cpt'?" in e.message
    e = _err(p, ["models.base.pth=x"])
    assert "unknown key 'pth'" in e.message and "'path'" in e.message
    e = _err(p, ["nmae=x"])
    assert "did you mean 'name'?" in e.message
    e = _err(p, ["stages.cpt.value"])
    assert "KEY.PATH=VALUE" in e.message
    e = _err(p, ["stages.cpt.value=[unclosed"])
    assert "not valid YAML" in e.message
    e = _err(p, ["stages.cpt.value=many"])  # a wrong type from the command line
    assert e.file == "--set stages.cpt.value=many" and e.path == "stages.cpt.value"


def test_set_overrides_values(rdir: Path) -> None:
    p = _write(rdir, GOOD)
    r = load_recipe(p, overrides=["stages.cpt.value=2.5", "stages.merged.models=[inst, cpt]"])
    assert r.nodes["cpt"].config.value == 2.5  # type: ignore[union-attr]
    assert r.nodes["merged"].deps == ["inst", "cpt"]


def test_missing_local_paths_are_validate_errors(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("models/inst", "models/nope").replace("data/*.jsonl", "data/*.jsonl"))
    r = load_recipe(p)
    with pytest.raises(RecipeError) as ei:
        r.validate()
    assert ei.value.path == "models.inst.path" and ei.value.line == 6 and "not found" in ei.value.message
    p = _write(rdir, GOOD.replace("data/*.jsonl", "data/*.parquet"))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p).validate()
    assert ei.value.path == "datasets.corpus.files" and "no files match" in ei.value.message


def test_dataset_description_is_appended_to_the_missing_files_error(rdir: Path) -> None:
    text = GOOD.replace("    files: data/*.jsonl\n", "    files: user/*.jsonl\n    description: >-\n"
                        "      put your corpus as JSONL\n      with a 'text' field under user/\n")
    p = _write(rdir, text)
    for run in (lambda r: r.validate(), lambda r: r.plan(), lambda r: r.apply()):
        with pytest.raises(RecipeError) as ei:
            run(load_recipe(p))
        e = ei.value
        assert e.path == "datasets.corpus.files" and e.line == 9 and e.file == str(p)
        assert "no files match 'user/*.jsonl'" in e.message
        # folded onto one line, after the glob error
        assert e.message.endswith("; expected: put your corpus as JSONL with a 'text' field under user/")
    # without a description the error is the bare glob error
    p = _write(rdir, GOOD.replace("data/*.jsonl", "user/*.jsonl"))
    with pytest.raises(RecipeError) as ei:
        load_recipe(p).validate()
    assert "expected:" not in ei.value.message
    # the description is documentation only: it does not change the cache key
    good = load_recipe(_write(rdir, GOOD)).plan()
    described = load_recipe(_write(rdir, GOOD.replace("    files: data/*.jsonl\n",
                                                      "    files: data/*.jsonl\n    description: x\n"))).plan()
    assert [n.key for n in good.nodes] == [n.key for n in described.nodes]


def test_only_and_force_names_checked(rdir: Path) -> None:
    r = load_recipe(_write(rdir, GOOD))
    with pytest.raises(ConfigError, match="did you mean 'merged'"):
        r.apply(only=["merge"], dry_run=True)


def test_extends_errors_point_at_the_file_that_wrote_the_key(rdir: Path) -> None:
    _write(rdir, GOOD.replace("    datasets: [corpus]", "    datasets: [corpus]\n    vallue: 1"), "parent.yaml")
    child = _write(rdir, "extends: parent.yaml\nname: child\n", "child.yaml")
    e = _err(child)
    assert e.file == str(rdir / "parent.yaml") and (e.line, e.path) == (15, "stages.cpt.vallue")
    _write(rdir, "extends: child.yaml\nname: a\n", "loop.yaml")
    _write(rdir, "extends: loop.yaml\nname: b\n", "child.yaml")
    e = _err(rdir / "loop.yaml")
    assert "cycle" in e.message and e.path == "extends"


def test_cli_reports_error_with_exit_code_2(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("models: [cpt, inst]", "models: [cpt, insta]"))
    res = CliRunner().invoke(main, ["validate", str(p)])
    assert res.exit_code == 2
    assert "17:19" in res.output and "did you mean 'inst'?" in res.output
    assert "Traceback" not in res.output


def test_init_source_errors(rdir: Path) -> None:
    p = _write(rdir, GOOD.replace("  base: {path: models/base}",
                                  "  base:\n    init: {config: {hidden_size: 8}, seed: 0}"))
    e = _err(p)
    assert e.path == "models.base.init.config" and "model_type" in e.message and e.line == 5
    p = _write(rdir, GOOD.replace("  base: {path: models/base}",
                                  "  base:\n    init: {config: {model_type: llama}, tokenizer: tok/nope}"))
    r = load_recipe(p)
    with pytest.raises(RecipeError) as ei:
        r.validate()
    assert ei.value.path == "models.base.init.tokenizer" and "neither a model of this recipe" in ei.value.message
    # a model name as tokenizer is a reference (a dependency), checked like any other
    p = _write(rdir, GOOD.replace("  base: {path: models/base}",
                                  "  base:\n    init: {config: {model_type: llama}, tokenizer: corpus}"))
    e = _err(p)
    assert e.path == "models.base.init.tokenizer" and "'corpus' is a dataset" in e.message
    p = _write(rdir, GOOD.replace("  base: {path: models/base}",
                                  "  base:\n    init: {config: {model_type: llama}, tokenizer: inst}"))
    assert load_recipe(p).nodes["base"].deps == ["inst"]
    assert load_recipe(p).order[:2] == ["inst", "base"]


def test_bad_node_name(rdir: Path) -> None:
    e = _err(_write(rdir, GOOD.replace("  inst:\n", "  my.inst:\n")))
    assert (e.line, e.column, e.path) == (5, 3, "models.my.inst") and "'_' and '-'" in e.message
