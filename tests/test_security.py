"""A recipe from another team is untrusted input: what it can and cannot make `plan` and `apply` do
(docs/security.md). Recipe-side cases; merge-, training- and evaluation-side cases live with their
areas' tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import test_recipe_fakes  # noqa: F401  (registers fake_concat / fake_eval)
from finrecipe import load_recipe
from finrecipe.cli import main
from finrecipe.errors import FormatError, PermissionDenied, RecipeError
from finrecipe.types import Grants

TEXT = """\
finrecipe: 1
name: t
models:
  base: {path: models/base}
stages:
  cpt:
    type: fake_concat
    models: [base]
"""


@pytest.fixture()
def rdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("FINRECIPE_ALLOW_PATHS", raising=False)  # the default: nothing granted
    d = tmp_path / "proj"
    (d / "models" / "base").mkdir(parents=True)
    (d / "models" / "base" / "weights.txt").write_text("base")
    (d / "models" / "base" / "config.json").write_text("{}")
    (d / "r.yaml").write_text(TEXT)
    return d


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_plan_and_validate_write_nothing(rdir: Path) -> None:
    before = _files(rdir)
    r = load_recipe(rdir / "r.yaml")
    r.validate()
    r.plan()
    assert _files(rdir) == before
    r.apply()
    before = _files(rdir)
    load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=3"]).plan()  # with a workdir already there
    assert _files(rdir) == before


def test_workdir_outside_the_recipe_needs_a_grant(rdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    (rdir / "w.yaml").write_text(TEXT + f"workdir: {out}\n")
    r = load_recipe(rdir / "w.yaml")
    plan = r.plan()  # plan shows the request and writes nothing there
    assert [(q.kind, ok) for q, ok in plan.requests] == [("path", False)] and not out.exists()
    with pytest.raises(PermissionDenied, match=f"--allow-path {out}"):
        r.apply()
    assert not out.exists()
    res = CliRunner().invoke(main, ["apply", str(rdir / "w.yaml")])
    assert res.exit_code == 2 and "workdir: writes every output" in res.output and not out.exists()
    res = CliRunner().invoke(main, ["apply", str(rdir / "w.yaml"), "--allow-path", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "run.json").is_file()
    (rdir / "root.yaml").write_text(TEXT + "workdir: /\n")
    with pytest.raises(PermissionDenied, match="--allow-path /"):
        load_recipe(rdir / "root.yaml").apply()


def test_paths_outside_the_recipe_need_a_grant(rdir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-models" / "m"
    other.mkdir(parents=True)
    (other / "weights.txt").write_text("x")
    (rdir / "o.yaml").write_text(TEXT.replace("path: models/base", f"path: {other}"))
    with pytest.raises(PermissionDenied, match="models.base.path reads"):
        load_recipe(rdir / "o.yaml").apply()
    assert load_recipe(rdir / "o.yaml").apply(grants=Grants(paths=(tmp_path / "other-models",))).ran == ["cpt"]
    # the user's own environment grants too
    os.environ["FINRECIPE_ALLOW_PATHS"] = str(tmp_path / "other-models")
    try:
        assert load_recipe(rdir / "o.yaml").apply().noop
    finally:
        del os.environ["FINRECIPE_ALLOW_PATHS"]
    # ../ out of the recipe's tree is outside too; a dataset glob as well
    (rdir / "d.yaml").write_text(TEXT + "datasets:\n  c: {files: ../../*.jsonl}\n")
    with pytest.raises(PermissionDenied, match="datasets.c.files reads"):
        load_recipe(rdir / "d.yaml").apply(dry_run=True)


def test_remote_code_needs_the_users_grant(rdir: Path) -> None:
    (rdir / "rc.yaml").write_text(TEXT.replace("{path: models/base}", "{path: models/base, trust_remote_code: true}"))
    res = CliRunner().invoke(main, ["plan", str(rdir / "rc.yaml")])
    assert res.exit_code == 0 and "not granted" in res.output and "--allow-remote-code base" in res.output
    res = CliRunner().invoke(main, ["apply", str(rdir / "rc.yaml")])
    assert res.exit_code == 2 and "trust_remote_code: true" in res.output and "--allow-remote-code" in res.output
    res = CliRunner().invoke(main, ["apply", str(rdir / "rc.yaml"), "--allow-remote-code", "base"])
    assert res.exit_code == 0, res.output


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize("text, msg", [
    (BOMB, "alias bomb"),
    ("finrecipe: 1\nname: &n [*n]\n", "more than 100 levels"),
    ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("finrecipe: 1\nname: t\x00\n", "unacceptable character"),
    ("finrecipe: 1\n? {a: 1}\n: 2\n", "a key must be a plain value"),
])
def test_hostile_yaml_fails_fast_with_one_line(rdir: Path, text: str, msg: str) -> None:
    p = rdir / "bad.yaml"
    p.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match=msg) as ei:
        load_recipe(p)
    assert time.monotonic() - t0 < 30  # generous: a bomb used to run for minutes
    assert "\n" not in str(ei.value)
    res = CliRunner().invoke(main, ["validate", str(p)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_extends_cycle_through_parent_dirs(rdir: Path) -> None:
    (rdir / "sub").mkdir()
    (rdir / "a.yaml").write_text("extends: sub/../a.yaml\n" + TEXT)
    with pytest.raises(RecipeError, match="'extends' forms a cycle"):
        load_recipe(rdir / "a.yaml")


@pytest.mark.parametrize("override, msg", [
    ("datasets.c.weight=.inf", "finite"),
    ("models.m.init.seed=1e23", "integer"),
    ("models.m.init.config.hidden_size=-4", "init: bad transformers config"),
    ("models.m.init.config.hidden_size=[1]", "init: bad transformers config"),
    ("models.m.init.config.hidden_size=1000000", "init: models are for tests and demos"),
])
def test_bad_numbers_are_one_line_errors(rdir: Path, override: str, msg: str) -> None:
    (rdir / "data.jsonl").write_text('{"text": "x"}\n')
    text = (TEXT.replace("models:\n", "models:\n  m: {init: {config: {model_type: llama, hidden_size: 8, "
                         "intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 2, vocab_size: 16}}}\n")
            + "datasets:\n  c: {files: data.jsonl}\n")
    text = text.replace("models: [base]", "models: [base, m]")
    (rdir / "n.yaml").write_text(text)
    res = CliRunner().invoke(main, ["apply", str(rdir / "n.yaml"), "--set", override])
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output


def test_a_fifo_in_a_model_directory_does_not_hang_plan(rdir: Path) -> None:
    os.mkfifo(rdir / "models" / "base" / "model.safetensors")
    with pytest.raises(FormatError, match="not a regular file"):
        load_recipe(rdir / "r.yaml").plan()


def test_a_model_listed_as_a_training_dataset_is_refused(rdir: Path) -> None:
    (rdir / "data.jsonl").write_text('{"text": "x"}\n')
    (rdir / "t.yaml").write_text(
        "finrecipe: 1\nname: v\nmodels:\n  base: {path: models/base}\ndatasets:\n  c: {files: data.jsonl}\n"
        "stages:\n  cpt:\n    type: continual_pretraining\n    model: base\n    datasets: [base]\n"
        "    seq_len: 8\n    epochs: 1\n")
    res = CliRunner().invoke(main, ["validate", str(rdir / "t.yaml")])
    assert res.exit_code == 2 and "'base' is a model (models.base), but a dataset is expected" in res.output


@pytest.mark.parametrize("override", ["stages.cpt.epochs=.inf", "stages.cpt.optimizer.lr=.nan",
                                      "stages.cpt.schedule.warmup_ratio=.inf"])
def test_non_finite_training_settings_are_refused(rdir: Path, override: str) -> None:
    (rdir / "data.jsonl").write_text('{"text": "x"}\n')
    (rdir / "t.yaml").write_text(
        "finrecipe: 1\nname: v\nmodels:\n  base: {path: models/base}\ndatasets:\n  c: {files: data.jsonl}\n"
        "stages:\n  cpt:\n    type: continual_pretraining\n    model: base\n    datasets: [c]\n"
        "    seq_len: 8\n    epochs: 1\n")
    res = CliRunner().invoke(main, ["validate", str(rdir / "t.yaml"), "--set", override])
    assert res.exit_code == 2 and "finite" in res.output and "Traceback" not in res.output, res.output


def test_an_unbounded_iteration_count_is_refused(tmp_path: Path,
                                                 related_models: Callable[..., dict[str, Path]]) -> None:
    m = related_models("llama", n=2)
    cfg = tmp_path / "k.yaml"
    cfg.write_text(f"merge_method: karcher\nmodels:\n  - model: {m['m1']}\n  - model: {m['m2']}\n"
                   "parameters: {max_iter: 1.0e18}\ndtype: float32\n")
    t0 = time.monotonic()
    res = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out")])
    assert res.exit_code == 2 and "max_iter" in res.output, res.output
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists()
