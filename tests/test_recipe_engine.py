"""The recipe engine with fake stage kinds: keys, caching, reruns, interruption, locks, extends, hub."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import test_recipe_fakes  # noqa: F401  (registers fake_concat / fake_eval)
from finrecipe import load_recipe
from finrecipe.errors import FinrecipeError, FormatError, LockMismatchError, StageError
from finrecipe.types import DatasetRef

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _model_dir(p: Path, content: str) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    (p / "weights.txt").write_text(content)
    (p / "config.json").write_text("{}")
    return p


RECIPE = """\
finrecipe: 1
name: t
models:
  base: {path: models/base}
  inst: {path: models/inst}
datasets:
  corpus: {files: "data/*.jsonl"}
stages:
  cpt:
    type: fake_concat
    models: [base]
    datasets: [corpus]
    value: 2
    count_file: COUNT
  merged:
    type: fake_concat
    models: [cpt, inst]
    count_file: COUNT
  ev:
    type: fake_eval
    model: merged
    count_file: COUNT
"""


@pytest.fixture()
def rdir(tmp_path: Path) -> Path:
    d = tmp_path / "proj"
    _model_dir(d / "models" / "base", "base")
    _model_dir(d / "models" / "inst", "inst")
    (d / "data").mkdir(parents=True)
    (d / "data" / "a.jsonl").write_text('{"text": "a"}\n')
    (d / "data" / "b.jsonl").write_text('{"text": "b"}\n')
    (d / "r.yaml").write_text(RECIPE.replace("COUNT", str(tmp_path / "count.log")))
    return d


def _count(rdir: Path) -> list[str]:
    p = rdir.parent / "count.log"
    return p.read_text().splitlines() if p.exists() else []


def _keys(path: Path) -> dict[str, str]:
    return {n.name: n.key for n in load_recipe(path).plan().nodes}


def _env(**kw: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(kw)
    return env


def test_apply_runs_in_order_and_reapply_is_noop(rdir: Path) -> None:
    r = load_recipe(rdir / "r.yaml")
    res = r.apply()
    assert res.ran == ["cpt", "merged", "ev"]
    assert [n.status for n in res.nodes] == ["cached", "cached", "cached", "ran", "ran", "ran"]
    assert _count(rdir) == ["start cpt 0", "done cpt", "start merged 0", "done merged", "done ev"]
    for n in res.nodes[3:]:
        assert n.out_dir is not None and (n.out_dir / "DONE.json").is_file()
        assert n.out_dir == r.workdir / n.name / n.key
    assert (r.workdir / "cpt" / res.nodes[3].key / "model" / "weights.txt").is_file()
    res2 = load_recipe(rdir / "r.yaml").apply()
    assert res2.noop and res2.ran == []
    assert len(_count(rdir)) == 5
    assert [n.status for n in load_recipe(rdir / "r.yaml").plan().nodes] == \
        ["local", "local", "local", "cached", "cached", "cached"]


def test_run_record_and_basic_report(rdir: Path) -> None:
    r = load_recipe(rdir / "r.yaml")
    r.apply()
    run = json.loads((r.workdir / "run.json").read_text())
    assert run["recipe"]["name"] == "t" and len(run["recipe"]["sha256"]) == 64
    assert run["finrecipe_version"] and run["started"] and run["finished"]
    by = {n["name"]: n for n in run["nodes"]}
    assert by["merged"]["type"] == "fake_concat" and by["merged"]["inputs"] == ["cpt", "inst"]
    assert by["merged"]["status"] == "ran" and by["merged"]["model_dir"].endswith("/model")
    assert by["ev"]["metrics"]["score"] >= 0 and by["base"]["type"] == "model"
    assert by["corpus"]["type"] == "dataset"
    # the report (finrecipe.report when present, else the basic one) is written from run.json
    assert (r.workdir / "report.md").is_file() and (r.workdir / "report.json").is_file()
    from finrecipe.report import build_basic_report as build_report

    assert build_report(r.workdir) == r.workdir / "report.md"
    md = (r.workdir / "report.md").read_text()
    assert "| merged | fake_concat |" in md and "| score |" in md
    rep = json.loads((r.workdir / "report.json").read_text())
    assert rep["counts"] == {"ran": 3, "cached": 3, "failed": 0, "pending": 0}
    logs = list((r.workdir / "logs").glob("apply-*.log"))
    assert logs and "node merged" in logs[0].read_text()


def test_keys_stable_across_processes_and_locations(rdir: Path, tmp_path: Path) -> None:
    keys = _keys(rdir / "r.yaml")
    code = ("import json, sys, test_recipe_fakes; from finrecipe import load_recipe; "
            "print(json.dumps({n.name: n.key for n in load_recipe(sys.argv[1]).plan().nodes}))")
    out = subprocess.run([sys.executable, "-c", code, str(rdir / "r.yaml")], cwd="/", check=True,
                         capture_output=True, text=True, env=_env(PYTHONHASHSEED="12345"))
    assert json.loads(out.stdout) == keys
    # a copy of the project elsewhere (new absolute paths, new mtimes) keys the same
    other = tmp_path / "elsewhere" / "deeper" / "proj2"
    shutil.copytree(rdir, other)
    assert _keys(other / "r.yaml") == keys
    # and the copy is fully cached if the workdir came along
    load_recipe(rdir / "r.yaml").apply()
    shutil.rmtree(other)
    shutil.copytree(rdir, other)
    assert load_recipe(other / "r.yaml").apply().noop


def test_changing_one_field_reruns_exactly_downstream(rdir: Path) -> None:
    load_recipe(rdir / "r.yaml").apply()
    n0 = len(_count(rdir))
    plan = load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=3"]).plan()
    st = {n.name: (n.status, n.reasons) for n in plan.nodes}
    assert st["cpt"] == ("stale", ["config value: 2.0 → 3.0"])
    assert st["merged"] == ("stale", ["input 'cpt' changed"])
    assert st["ev"] == ("stale", ["input 'merged' changed"])
    res = load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=3"]).apply()
    assert res.ran == ["cpt", "merged", "ev"]
    # change a model's content: only its consumers rerun
    (rdir / "models" / "inst" / "weights.txt").write_text("inst v2")
    res = load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=3"]).apply()
    assert res.ran == ["merged", "ev"]
    # a field excluded from the key (count_file) changes nothing
    res = load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=3", "stages.cpt.count_file=null"]).apply()
    assert res.ran == []
    # going back to value 2 reruns only what has no cached output for the new inputs
    res = load_recipe(rdir / "r.yaml").apply()
    assert res.ran == ["merged", "ev"] and res.cached[-1] == "cpt"
    # a new dataset file changes the dataset key: cpt and everything after reruns
    (rdir / "data" / "c.jsonl").write_text('{"text": "c"}\n')
    assert load_recipe(rdir / "r.yaml").apply().ran == ["cpt", "merged", "ev"]
    assert len(_count(rdir)) == n0 + 5 + 3 + 3 + 5


def test_only_force_and_dry_run(rdir: Path) -> None:
    r = load_recipe(rdir / "r.yaml")
    dry = r.apply(dry_run=True)
    assert dry.dry_run and [n.status for n in dry.nodes][3:] == ["pending"] * 3
    assert dry.would_run == ["cpt", "merged", "ev"] and r.apply(dry_run=True, only=["cpt"]).would_run == ["cpt"]
    assert not (r.workdir / "cpt").exists() and not (r.workdir / "run.json").exists()
    res = r.apply(only=["cpt"])
    assert res.ran == ["cpt"] and [n.status for n in res.nodes][4:] == ["pending", "pending"]
    res = load_recipe(rdir / "r.yaml").apply(only=["merged"])
    assert res.ran == ["merged"]
    assert load_recipe(rdir / "r.yaml").apply(dry_run=True, force=["cpt"]).would_run == ["cpt", "ev"]
    res = load_recipe(rdir / "r.yaml").apply(force=["cpt"])
    assert res.ran == ["cpt", "ev"]  # cpt forced (same key, so merged stays cached); ev was missing
    assert _count(rdir).count("done cpt") == 2


def test_failure_is_recorded_and_finished_nodes_survive(rdir: Path) -> None:
    with pytest.raises(StageError, match="stage 'merged' .* failed: RuntimeError: fake failure"):
        load_recipe(rdir / "r.yaml", overrides=["stages.merged.fail=true"]).apply()
    r = load_recipe(rdir / "r.yaml")
    run = json.loads((r.workdir / "run.json").read_text())
    assert [n["status"] for n in run["nodes"]] == ["cached"] * 3 + ["ran", "failed", "pending"]
    assert "fake failure" in run["nodes"][4]["error"]
    assert (r.workdir / "report.md").is_file()
    assert load_recipe(rdir / "r.yaml").apply().ran == ["merged", "ev"]


def test_concurrent_apply_is_refused(rdir: Path) -> None:
    from finrecipe.recipe.execute import workdir_lock

    r = load_recipe(rdir / "r.yaml")
    with workdir_lock(r.workdir), pytest.raises(FinrecipeError, match="another `finrecipe apply` is running"):
        r.apply()
    assert r.apply().ran == ["cpt", "merged", "ev"]  # the lock is released


def test_sigkill_during_apply_loses_nothing(rdir: Path) -> None:
    text = (rdir / "r.yaml").read_text().replace(
        "    models: [cpt, inst]\n", "    models: [cpt, inst]\n    steps: 60\n    step_seconds: 0.05\n")
    (rdir / "r.yaml").write_text(text)
    code = "import sys, test_recipe_fakes; from finrecipe import load_recipe; load_recipe(sys.argv[1]).apply()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(rdir / "r.yaml")], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wd = rdir / "runs" / "t"
    deadline = time.monotonic() + 60
    steps_file = None
    try:
        while time.monotonic() < deadline:
            hits = list((wd / "merged").glob("*/work/steps")) if (wd / "merged").is_dir() else []
            if hits and int(hits[0].read_text() or 0) >= 5:
                steps_file = hits[0]
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        assert steps_file is not None, "the slow stage never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = int(steps_file.read_text())
    assert done_before < 60
    cpt_dirs = list((wd / "cpt").glob("*/DONE.json"))
    assert len(cpt_dirs) == 1  # the finished node is intact
    assert not list((wd / "merged").glob("*/DONE.json"))
    assert _count(rdir) == ["start cpt 0", "done cpt", "start merged 0"]
    res = load_recipe(rdir / "r.yaml").apply()
    assert res.ran == ["merged", "ev"]
    log = _count(rdir)
    assert log.count("done cpt") == 1  # nothing finished was redone
    resumed = [ln for ln in log if ln.startswith("start merged ")][-1]
    assert int(resumed.split()[-1]) >= done_before - 1  # resumed from the scratch state in out_dir/work
    assert load_recipe(rdir / "r.yaml").apply().noop


def test_lockfile_written_and_mismatch_reported(rdir: Path) -> None:
    r = load_recipe(rdir / "r.yaml")
    r.apply()
    lock = yaml.safe_load(r.lock_path.read_text())
    assert r.lock_path.name == "r.yaml.lock"
    files = lock["datasets"]["corpus"]["files"]
    assert [f["path"] for f in files] == ["data/a.jsonl", "data/b.jsonl"]
    assert files[0]["size"] == 14 and len(files[0]["sha256"]) == 64
    assert lock["models"]["base"]["path"] == "models/base" and lock["finrecipe_version"]
    assert load_recipe(rdir / "r.yaml").apply(locked=True).noop
    (rdir / "data" / "b.jsonl").write_text('{"text": "changed"}\n')
    (rdir / "models" / "inst" / "weights.txt").write_text("other")
    with pytest.raises(LockMismatchError) as ei:
        load_recipe(rdir / "r.yaml").apply(locked=True)
    msg = str(ei.value)
    assert "datasets.corpus: file data/b.jsonl changed (size 14 → 20" in msg
    assert "models.inst.content" in msg and "--locked" in msg
    with pytest.raises(LockMismatchError):
        load_recipe(rdir / "r.yaml").apply(locked=True, dry_run=True)
    # without --locked the build goes ahead and the lockfile follows
    assert load_recipe(rdir / "r.yaml").apply().ran == ["cpt", "merged", "ev"]
    assert load_recipe(rdir / "r.yaml").apply(locked=True).noop
    r.lock_path.unlink()
    with pytest.raises(LockMismatchError, match="no lockfile"):
        load_recipe(rdir / "r.yaml").apply(locked=True)
    assert load_recipe(rdir / "r.yaml").lock() == r.lock_path and r.lock_path.is_file()


def test_lockfile_elsewhere_or_not_written(rdir: Path, tmp_path: Path) -> None:
    beside = rdir / "r.yaml.lock"
    elsewhere = tmp_path / "locks" / "r.lock"
    elsewhere.parent.mkdir()
    # Python API: lock_file= moves it, write_lock=False skips writing it
    assert load_recipe(rdir / "r.yaml").apply(write_lock=False).ran == ["cpt", "merged", "ev"]
    assert not beside.exists() and not elsewhere.exists()
    r = load_recipe(rdir / "r.yaml", lock_file=elsewhere)
    assert r.lock_path == elsewhere
    res = r.apply()
    assert res.noop and res.lock_written and elsewhere.is_file() and not beside.exists()
    lock = yaml.safe_load(elsewhere.read_text())
    # paths stay relative to the recipe, wherever the lockfile is
    assert [f["path"] for f in lock["datasets"]["corpus"]["files"]] == ["data/a.jsonl", "data/b.jsonl"]
    assert load_recipe(rdir / "r.yaml", lock_file=elsewhere).apply(locked=True).noop
    with pytest.raises(LockMismatchError, match="no lockfile"):  # RECIPE.lock itself does not exist
        load_recipe(rdir / "r.yaml").apply(locked=True)
    # a changed input: --locked against the moved lockfile refuses; write_lock=False leaves it as it was
    before = elsewhere.read_text()
    (rdir / "data" / "b.jsonl").write_text('{"text": "changed"}\n')
    with pytest.raises(LockMismatchError, match="data/b.jsonl changed"):
        load_recipe(rdir / "r.yaml", lock_file=elsewhere).apply(locked=True)
    res = load_recipe(rdir / "r.yaml", lock_file=elsewhere).apply(write_lock=False)
    assert res.ran == ["cpt", "merged", "ev"] and not res.lock_written
    assert elsewhere.read_text() == before and not beside.exists()
    # `lock` and the CLI options
    from click.testing import CliRunner

    from finrecipe.cli import main

    cli = CliRunner()
    p = str(rdir / "r.yaml")
    res_cli = cli.invoke(main, ["apply", "-q", p, "--locked", "--lock-file", str(elsewhere)])
    assert res_cli.exit_code == 2 and "data/b.jsonl changed" in res_cli.output
    res_cli = cli.invoke(main, ["lock", p, "--lock-file", str(elsewhere)])
    assert res_cli.exit_code == 0 and elsewhere.read_text() != before and not beside.exists()
    res_cli = cli.invoke(main, ["apply", "-q", p, "--locked", "--lock-file", str(elsewhere)])
    assert res_cli.exit_code == 0 and "nothing to do" in res_cli.output
    (rdir / "data" / "a.jsonl").write_text('{"text": "changed too"}\n')
    locked_text = elsewhere.read_text()
    res_cli = cli.invoke(main, ["apply", "-q", p, "--no-lock", "--lock-file", str(elsewhere)])
    assert res_cli.exit_code == 0 and "ran 3" in res_cli.output and "updated" not in res_cli.output
    assert elsewhere.read_text() == locked_text and not beside.exists()
    res_cli = cli.invoke(main, ["plan", "--json", p, "--lock-file", str(elsewhere)])
    assert res_cli.exit_code == 0 and not beside.exists()


def test_extends_deep_merge_and_relative_paths(rdir: Path) -> None:
    shared = rdir / "shared"
    _model_dir(shared / "models" / "base", "shared base")
    (shared / "team.yaml").write_text(textwrap.dedent("""\
        finrecipe: 1
        name: team
        description: shared
        models:
          base: {path: models/base}
        stages:
          cpt:
            type: fake_concat
            models: [base]
            value: 1
          extra:
            type: fake_concat
            models: [cpt]
        """))
    (rdir / "mine.yaml").write_text(textwrap.dedent("""\
        extends: shared/team.yaml
        name: mine
        models:
          inst: {path: models/inst}
        stages:
          cpt:
            value: 5
          extra: null
          merged:
            type: fake_concat
            models: [cpt, inst]
        """))
    r = load_recipe(rdir / "mine.yaml")
    assert r.name == "mine" and r.schema.description == "shared"
    assert r.order == ["base", "inst", "cpt", "merged"]
    assert r.nodes["cpt"].config.value == 5  # type: ignore[union-attr]
    assert r.workdir == rdir / "runs" / "mine"
    res = r.apply()
    by = {n.name: n for n in res.nodes}
    assert by["base"].model_dir == shared / "models" / "base"  # relative to the file that wrote it
    assert by["inst"].model_dir == rdir / "models" / "inst"
    assert res.ran == ["cpt", "merged"]
    # paths inside a stage resolve against the file that defines the stage
    assert by["cpt"].metrics["recipe_dir"] == str(shared) and by["merged"].metrics["recipe_dir"] == str(rdir)


def test_hub_sources_with_a_fake_downloader(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finrecipe import sources

    calls: dict[str, list[object]] = {"resolve": [], "download": []}
    commit = "a" * 40

    def resolve(repo: str, revision: str | None, repo_type: str = "model") -> str:
        calls["resolve"].append((repo, revision, repo_type))
        return commit if revision == "main" else "b" * 40

    def snapshot(repo: str, c: str, *, allow_patterns: list[str], repo_type: str = "model") -> Path:
        calls["download"].append((repo, c, tuple(allow_patterns), repo_type))
        dest = rdir / "hf-cache" / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots" / c
        dest.mkdir(parents=True, exist_ok=True)
        if repo_type == "dataset":
            (dest / "train.jsonl").write_text('{"text": "hub"}\n')
            return dest
        (dest / "config.json").write_text("{}")
        (dest / "weights.txt").write_text(f"hub {repo}")
        if repo != "org/pickles":
            (dest / "model.safetensors").write_bytes(b"x")
        return dest

    monkeypatch.setattr(sources, "hub_resolve_commit", resolve)
    monkeypatch.setattr(sources, "hub_snapshot", snapshot)
    text = (rdir / "r.yaml").read_text().replace("  base: {path: models/base}",
                                                 "  base: {hub: org/base, revision: main}")
    text = text.replace('  corpus: {files: "data/*.jsonl"}', "  corpus: {hub: org/corpus, revision: main}")
    (rdir / "h.yaml").write_text(text)
    res = load_recipe(rdir / "h.yaml").apply()
    assert res.ran == ["base", "corpus", "cpt", "merged", "ev"]
    pats = calls["download"][0][2]
    assert "*.safetensors" in pats and not any(".bin" in p for p in pats)  # no pickles by default
    lock = yaml.safe_load((rdir / "h.yaml.lock").read_text())
    assert lock["models"]["base"] == {"hub": "org/base", "revision": "main", "commit": commit}
    assert lock["datasets"]["corpus"]["commit"] == commit
    assert lock["datasets"]["corpus"]["files"][0]["path"] == "train.jsonl"
    n_resolve = len(calls["resolve"])
    # re-apply: commits come from the lockfile, nothing is resolved or downloaded again
    assert load_recipe(rdir / "h.yaml").apply(locked=True).noop
    assert len(calls["resolve"]) == n_resolve and len(calls["download"]) == 2
    # a different revision resolves to another commit: a rebuild, and --locked refuses it
    with pytest.raises(LockMismatchError, match="models.base.commit"):
        load_recipe(rdir / "h.yaml", overrides=["models.base.revision=v2"]).apply(locked=True)
    res = load_recipe(rdir / "h.yaml", overrides=["models.base.revision=v2"]).apply()
    assert res.ran == ["base", "cpt", "merged", "ev"]
    # pickle-only repos are refused unless allow_pickle
    (rdir / "p.yaml").write_text(text.replace("org/base", "org/pickles"))
    with pytest.raises(FormatError, match="allow_pickle: true"):
        load_recipe(rdir / "p.yaml").apply()
    keydirs = list((rdir / "runs" / "t" / "base").iterdir())
    assert sorted((d / "DONE.json").is_file() for d in keydirs) == [False, True, True]
    # the workdir refers to the Hugging Face cache's snapshot instead of holding a second copy
    assert not any((d / "model").exists() for d in keydirs)
    done = [json.loads((d / "DONE.json").read_text()) for d in keydirs if (d / "DONE.json").is_file()]
    assert all(Path(m["result"]["model_dir"]).parent.name == "snapshots" for m in done)


def test_dataset_format_inference_and_refs(rdir: Path) -> None:
    r = load_recipe(rdir / "r.yaml")
    res = r.apply()
    from finrecipe.recipe.resolve import resolve
    from finrecipe.util.content import ShaCache

    refs = resolve(r, shas=ShaCache(None))
    ds = refs["corpus"].local_output
    assert isinstance(ds, DatasetRef)
    assert ds is not None and ds.format == "jsonl" and [f.name for f in ds.files] == ["a.jsonl", "b.jsonl"]
    assert len(ds.sha256) == 2 and res.ran
    (rdir / "data" / "x.bin").write_text("?")
    text = (rdir / "r.yaml").read_text().replace('"data/*.jsonl"', '"data/*"')
    (rdir / "q.yaml").write_text(text)
    with pytest.raises(FinrecipeError, match="set 'format:'"):
        load_recipe(rdir / "q.yaml").plan()


def test_report_falls_back_to_the_basic_one(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finrecipe.report as rep

    def broken(workdir: Path) -> None:
        raise RuntimeError("report bug")

    monkeypatch.setattr(rep, "build_report", broken)
    with pytest.raises(StageError):
        load_recipe(rdir / "r.yaml", overrides=["stages.merged.fail=true"]).apply()
    wd = rdir / "runs" / "t"
    md = (wd / "report.md").read_text()
    assert "## Failures" in md and "fake failure" in md and "| cpt | fake_concat |" in md


def test_ctrl_c_during_apply_via_cli(rdir: Path) -> None:
    text = (rdir / "r.yaml").read_text().replace(
        "    models: [cpt, inst]\n", "    models: [cpt, inst]\n    steps: 100\n    step_seconds: 0.05\n")
    (rdir / "r.yaml").write_text(text)
    code = "import sys, test_recipe_fakes; from finrecipe.cli import main; main(['apply', '-q', sys.argv[1]])"
    # Ctrl-C as in a terminal: SIGINT's default disposition in the child even when this test runs where
    # it is ignored (a background job: `cmd &` in a script, nohup), which Python would then keep ignoring
    proc = subprocess.Popen([sys.executable, "-c", code, str(rdir / "r.yaml")], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wd = rdir / "runs" / "t"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if list(wd.glob("merged/*/work/steps")):
                break
            assert proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    run = json.loads((wd / "run.json").read_text())
    assert [n["status"] for n in run["nodes"]][3:] == ["ran", "failed", "pending"]
    assert "KeyboardInterrupt" in run["nodes"][4]["error"]
    assert load_recipe(rdir / "r.yaml").apply().ran == ["merged", "ev"]
    assert _count(rdir).count("done cpt") == 1


def test_unresolvable_hub_revision_offline_is_a_clear_error(rdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = (rdir / "r.yaml").read_text().replace("  base: {path: models/base}",
                                                 "  base: {hub: org/base, revision: main}")
    (rdir / "h.yaml").write_text(text)
    r = load_recipe(rdir / "h.yaml")
    r.validate()  # nothing to download or resolve for validate
    plan = {n.name: n for n in r.plan().nodes}  # plan works offline, showing what it cannot key
    assert plan["base"].key == "unresolved" and "not resolved" in plan["base"].reasons[0]
    assert plan["cpt"].reasons == ["input 'base' is not resolved"] and plan["ev"].status == "to run"
    assert plan["inst"].status == "local" and plan["inst"].key != "unresolved"
    with pytest.raises(FinrecipeError, match="cannot resolve revision 'main' of model 'org/base'") as ei:
        r.apply()
    assert "finrecipe lock" in str(ei.value)


def test_deleted_output_is_rebuilt(rdir: Path) -> None:
    res = load_recipe(rdir / "r.yaml").apply()
    merged = next(n for n in res.nodes if n.name == "merged")
    assert merged.model_dir is not None
    shutil.rmtree(merged.model_dir)
    plan = {n.name: n.status for n in load_recipe(rdir / "r.yaml").plan().nodes}
    assert plan["merged"] == "to run" and plan["cpt"] == "cached" and plan["ev"] == "cached"
    assert load_recipe(rdir / "r.yaml").apply().ran == ["merged"]


def test_cli_plan_apply_lock(rdir: Path) -> None:
    from click.testing import CliRunner

    from finrecipe.cli import main

    cli = CliRunner()
    p = str(rdir / "r.yaml")
    res = cli.invoke(main, ["plan", "--json", p])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert [n["status"] for n in plan["nodes"]] == ["local"] * 3 + ["to run"] * 3
    est = {n["name"]: n["estimated_bytes"] for n in plan["nodes"]}
    assert est["base"] == 6 and est["cpt"] == 6 and est["merged"] == 6  # inputs' size as a guess
    res = cli.invoke(main, ["apply", "--dry-run", p])
    assert res.exit_code == 0 and "3 would run: cpt, merged, ev" in res.output
    res = cli.invoke(main, ["apply", "-q", p, "--only", "cpt"])
    assert res.exit_code == 0 and "reused" in res.output
    res = cli.invoke(main, ["apply", "-q", p])
    assert res.exit_code == 0 and "ran 2" in res.output
    res = cli.invoke(main, ["apply", p, "--locked"])
    assert res.exit_code == 0 and "nothing to do" in res.output
    (rdir / "data" / "a.jsonl").write_text("changed\n")
    res = cli.invoke(main, ["apply", p, "--locked"])
    assert res.exit_code == 2 and "data/a.jsonl changed" in res.output
    res = cli.invoke(main, ["lock", p])
    assert res.exit_code == 0 and "r.yaml.lock" in res.output
    res = cli.invoke(main, ["plan", "--json", p, "--set", "stages.cpt.value=9"])
    assert res.exit_code == 0
    cpt = json.loads(res.output)["nodes"][3]
    assert cpt["status"] == "stale" and "config value: 2.0 → 9.0" in cpt["reasons"]
    assert any(r.startswith("inputs.corpus") or "corpus" in r for r in cpt["reasons"])
    res = cli.invoke(main, ["plan", p])
    assert res.exit_code == 0 and "stale" in res.output and "3 to run: cpt, merged, ev" in res.output


def test_trust_remote_code_is_per_source_and_inherited(rdir: Path) -> None:
    from finrecipe.errors import PermissionDenied
    from finrecipe.types import Grants

    with pytest.raises(PermissionDenied, match="--allow-remote-code base"):  # the recipe alone: refused
        load_recipe(rdir / "r.yaml", overrides=["models.base.trust_remote_code=true"]).apply()
    res = load_recipe(rdir / "r.yaml", overrides=["models.base.trust_remote_code=true"]).apply(
        grants=Grants(remote_code=frozenset({"base"})))
    m = {n.name: n.metrics for n in res.nodes}
    assert m["cpt"]["trust"] is True and m["merged"]["trust"] is True  # merged gets it through cpt
    res = load_recipe(rdir / "r.yaml", overrides=["models.inst.trust_remote_code=false"]).apply()
    assert {n.name: n.metrics for n in res.nodes}["cpt"]["trust"] is True  # cached from the first run
    other = load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=7"]).apply()
    assert {n.name: n.metrics for n in other.nodes}["cpt"]["trust"] is False


def test_state_follows_the_last_apply_even_when_nothing_ran(rdir: Path) -> None:
    load_recipe(rdir / "r.yaml").apply()
    load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=3"]).apply()
    state_path = rdir / "runs" / "t" / "state.json"
    assert json.loads(state_path.read_text())["nodes"]["cpt"]["material"]["config"]["value"] == 3.0
    assert load_recipe(rdir / "r.yaml").apply().noop  # back to value 2: all cached
    assert json.loads(state_path.read_text())["nodes"]["cpt"]["material"]["config"]["value"] == 2.0
    mtime = state_path.stat().st_mtime_ns
    assert load_recipe(rdir / "r.yaml").apply().noop
    assert state_path.stat().st_mtime_ns == mtime  # an untouched re-apply writes no state
    plan = {n.name: n for n in load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=4"]).plan().nodes}
    assert plan["cpt"].reasons == ["config value: 2.0 → 4.0"]


def test_extends_a_list_merges_in_order(rdir: Path) -> None:
    (rdir / "a.yaml").write_text("finrecipe: 1\nname: a\nmodels:\n  base: {path: models/base}\n"
                                 "stages:\n  cpt: {type: fake_concat, models: [base], value: 1}\n")
    (rdir / "b.yaml").write_text("name: b\nmodels:\n  inst: {path: models/inst}\n"
                                 "stages:\n  cpt: {value: 2}\n")
    (rdir / "c.yaml").write_text("extends: [a.yaml, b.yaml]\nstages:\n  m: {type: fake_concat, models: [cpt, inst]}\n")
    r = load_recipe(rdir / "c.yaml")
    assert r.name == "b" and r.order == ["base", "inst", "cpt", "m"]
    assert r.nodes["cpt"].config.value == 2  # type: ignore[union-attr]
    assert r.nodes["cpt"].config.models == ["base"]  # type: ignore[union-attr]


def test_progress_in_logs_is_timestamped_lines(rdir: Path) -> None:
    """stderr not a terminal (SLURM, nohup, CI): plain timestamped lines, no bar redraws."""
    import re

    code = ("import sys, test_recipe_fakes; from finrecipe.cli import main; "
            "sys.argv = ['finrecipe', 'apply', sys.argv[1]]; main()")
    env = {**_env(), "FINRECIPE_PROGRESS_INTERVAL": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(rdir / "r.yaml")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", ln)]
    assert any("apply t" in ln and "node 3/3 (100%)" in ln and "done in" in ln for ln in lines), out.stderr
    assert any(ln.endswith("merged (fake_concat): running → " + str(rdir / "runs" / "t" / "merged")
                           + "/" + ln.rsplit("/", 1)[-1]) for ln in lines)
    assert "\x1b[" not in out.stderr and "━" not in out.stderr  # no ANSI codes, no bar


def test_leftovers_of_killed_runs_are_swept(rdir: Path) -> None:
    from click.testing import CliRunner

    from finrecipe.cli import main

    r = load_recipe(rdir / "r.yaml")
    r.apply()
    dead = 2**22 + 12345  # a pid that is not running
    wd = r.workdir
    merged = next((wd / "merged").iterdir())
    (merged / f".model.finrecipe-tmp-{dead}-abcd").mkdir()  # a killed merge's output
    (merged / f".model.finrecipe-tmp-{dead}-abcd" / "big.safetensors").write_bytes(b"0" * 1000)
    (wd / f".report.md.tmp-{dead}-1-ab").write_text("half")  # a killed report write
    live = wd / f".report.md.tmp-{os.getpid()}-1-ab"  # this process's own: kept
    live.write_text("mine")
    (wd / "cpt" / "0123456789abcdef").mkdir()  # a node directory that never finished
    res = CliRunner().invoke(main, ["clean", str(rdir / "r.yaml")])
    assert res.exit_code == 0 and "2 removed" in res.output, res.output
    assert not any(p.name.startswith(f".model.finrecipe-tmp-{dead}") for p in merged.iterdir())
    assert live.exists() and (wd / "cpt" / "0123456789abcdef").is_dir()
    res = CliRunner().invoke(main, ["clean", str(rdir / "r.yaml"), "--unfinished"])
    assert res.exit_code == 0 and not (wd / "cpt" / "0123456789abcdef").exists()
    # an older version's finished output goes with --unused; the current one stays
    load_recipe(rdir / "r.yaml", overrides=["stages.cpt.value=5"]).apply()
    assert len(list((wd / "cpt").iterdir())) == 2
    CliRunner().invoke(main, ["clean", str(rdir / "r.yaml"), "--unused"])
    assert len(list((wd / "cpt").iterdir())) == 1 and load_recipe(rdir / "r.yaml").apply().noop
    # apply sweeps too
    (merged / f".model.finrecipe-tmp-{dead}-ffff").mkdir()
    load_recipe(rdir / "r.yaml").apply()
    assert not (merged / f".model.finrecipe-tmp-{dead}-ffff").exists()
    live.unlink()


def test_multi_node_ranks_share_one_workdir(rdir: Path) -> None:
    """Every machine runs the same apply on shared storage: rank 1 waits for rank 0 to build the
    inputs, joins the multi-node stage only, and leaves markers, records and the report to rank 0."""
    text = (rdir / "r.yaml").read_text() + (
        f"  dist:\n    type: fake_dist\n    models: [cpt]\n    nnodes: 2\n    count_file: {rdir.parent / 'count.log'}\n")
    (rdir / "m.yaml").write_text(text)
    code = ("import sys, test_recipe_fakes; from finrecipe.cli import main; "
            "sys.argv = ['finrecipe', 'apply', sys.argv[1], '--node-rank', '1', '-q']; main()")
    env = {**_env(), "FINRECIPE_WORKER_POLL_SECONDS": "0.1"}
    worker = subprocess.Popen([sys.executable, "-c", code, str(rdir / "m.yaml")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((rdir / "runs" / "t").glob(".apply.node1.lock")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert worker.poll() is None  # waiting for rank 0 to build cpt
        assert not (rdir / "runs" / "t" / "run.json").exists()
        res = load_recipe(rdir / "m.yaml").apply()  # rank 0, concurrently: its own lock
        out, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, out
    assert "dist rank 1" in _count(rdir) and "dist rank 0" in _count(rdir)
    assert res.ran == ["cpt", "merged", "ev", "dist"]
    markers = list((rdir / "runs" / "t" / "dist").glob("*/DONE.json"))
    assert len(markers) == 1  # one node, one output directory, one marker: rank 0's
    assert load_recipe(rdir / "m.yaml").apply().noop
