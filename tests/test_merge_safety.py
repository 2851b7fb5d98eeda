"""Hostile inputs, interrupted merges and the CLI's exit codes: nothing half-written is ever left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from finrecipe.cli import main
from finrecipe.errors import FormatError, IoError, MismatchError
from finrecipe.merge import MergeConfig, read_model, run_merge, validate_merge
from reference.headers import py_read_model


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "finrecipe-tmp" in p.name]


def ta(ms: dict[str, Path], other: Path | None = None) -> dict[str, Any]:
    return {"merge_method": "task_arithmetic", "base_model": str(ms["base"]),
            "models": [{"model": str(other or ms["m1"]), "parameters": {"weight": 1.0}}]}


def _header_bytes(obj: Any) -> bytes:
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h


def _hostile(path: Path, kind: str) -> None:
    """Corrupt `path` (a valid safetensors file) in one of several ways."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    first = next(k for k in header if k != "__metadata__")
    if kind == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif kind == "huge_header_len":
        path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif kind == "garbage_json":
        path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + body)
    elif kind == "overlap":
        header[first]["data_offsets"] = [0, header[first]["data_offsets"][1] - header[first]["data_offsets"][0]]
        second = [k for k in header if k not in ("__metadata__", first)][0]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        path.write_bytes(_header_bytes(header) + body)
    elif kind == "bad_dtype":
        header[first]["dtype"] = "F99"
        path.write_bytes(_header_bytes(header) + body)
    elif kind == "shape_vs_offsets":
        header[first]["shape"] = [s + 1 for s in header[first]["shape"]]
        path.write_bytes(_header_bytes(header) + body)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "huge_header_len", "garbage_json", "overlap", "bad_dtype",
                                  "shape_vs_offsets", "empty"])
def test_hostile_safetensors_rejected_and_nothing_left(related_models: Any, tmp_path: Path,
                                                       kind: str) -> None:
    ms = related_models("llama", "bfloat16")
    bad = tmp_path / "bad"
    shutil.copytree(ms["m1"], bad)
    _hostile(bad / "model.safetensors", kind)
    with pytest.raises(FormatError) as ei:
        read_model(bad)
    assert "model.safetensors" in str(ei.value)
    with pytest.raises(FormatError):  # the independent pure-Python reader agrees
        py_read_model(bad)
    with pytest.raises(FormatError):
        run_merge(MergeConfig.from_dict(ta(ms, bad)), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_bad_index_and_missing_shard(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16", shard_bytes=60_000)
    bad = tmp_path / "bad"
    shutil.copytree(ms["m1"], bad)
    (bad / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(FormatError, match="index"):
        read_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(ms["m1"], bad)
    next(bad.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises((IoError, FormatError), match="model-00002"):
        read_model(bad)
    with pytest.raises(FormatError, match="no model.safetensors"):
        read_model(tmp_path)


def test_keyboard_interrupt_leaves_nothing(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16", shard_bytes=60_000)

    class Interrupting:
        def task(self, *a: Any, **k: Any) -> Any:
            class T:
                def update(self, **kw: Any) -> None:
                    raise KeyboardInterrupt

                def __enter__(self) -> T:
                    return self

                def __exit__(self, *a: Any) -> None:
                    return None

            return T()

        def log(self, m: str) -> None:
            pass

    with pytest.raises(KeyboardInterrupt):
        run_merge(MergeConfig.from_dict(ta(ms)), tmp_path / "out", progress=Interrupting(),
                  out_shard_size=50_000)
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from finrecipe.merge import MergeConfig, run_merge
    cfg = MergeConfig.from_dict({cfg!r})
    marker = Path({marker!r})

    class Slow:
        def task(self, *a, **k):
            class T:
                def update(self, **kw):
                    marker.write_text("started")
                    time.sleep(60)
                def __enter__(self): return self
                def __exit__(self, *a): return None
            return T()
        def log(self, m): pass

    run_merge(cfg, {out!r}, progress=Slow(), out_shard_size=50_000)
""")


def test_sigkill_mid_merge_then_rerun_cleans_up(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16", shard_bytes=60_000)
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    script = _KILL_SCRIPT.format(cfg=ta(ms), marker=str(marker), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the merge finished or failed before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert no_leftovers(tmp_path), "the killed run's temp dir is expected until the next run"
    run_merge(MergeConfig.from_dict(ta(ms)), out)
    assert (out / "model.safetensors").is_file()
    assert not no_leftovers(tmp_path)


def test_cli_exit_codes_and_no_tracebacks(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16")
    good = tmp_path / "good.yml"
    good.write_text(json.dumps(ta(ms)))  # JSON is YAML
    runner = CliRunner()

    class R:
        def __init__(self, r: Any) -> None:
            self.exit_code = r.exit_code
            self.output = " ".join(r.output.split())  # rich wraps long lines
            assert "Traceback" not in r.output

    def invoke(args: list[str]) -> R:
        return R(runner.invoke(main, args))

    r = invoke(["merge", str(good), str(tmp_path / "out"), "--quiet", "--out-shard-size", "100KB"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 2
    r = invoke(["merge", str(good), str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 1 and "already exists" in r.output and "--overwrite" in r.output
    r = invoke(["merge", str(good), str(tmp_path / "out"), "--quiet", "--overwrite"])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.yml"
    bad.write_text(json.dumps({**ta(ms), "merge_method": "tie"}))
    r = invoke(["merge", str(bad), str(tmp_path / "o2")])
    assert r.exit_code == 2 and "did you mean 'ties'" in r.output
    r = invoke(["merge", str(tmp_path / "nope.yml"), str(tmp_path / "o2")])
    assert r.exit_code == 2 and "file not found" in r.output
    r = invoke(["merge", str(good), str(tmp_path / "o2"), "--out-shard-size", "5XB"])
    assert r.exit_code == 2 and "not a size" in r.output
    r = invoke(["inspect", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0
    info = json.loads(runner.invoke(main, ["inspect", str(tmp_path / "out"), "--json"]).output)
    assert info["num_params"] == read_model(ms["base"]).num_params and info["files"] == ["model.safetensors"]
    r = invoke(["inspect", str(tmp_path / "out")])
    assert r.exit_code == 0 and "parameters" in r.output and "model.embed_tokens.weight" in r.output
    r = invoke(["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such file" in r.output.lower()
    assert not (tmp_path / "o2").exists() and not no_leftovers(tmp_path)


def test_size_parser() -> None:
    from finrecipe.cli.merge import parse_size

    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError):
        parse_size("lots")


def test_reference_reader_agrees_with_core(related_models: Any) -> None:
    for shard in (None, 60_000):
        ms = related_models("llama", "bfloat16", shard_bytes=shard)
        a, b = read_model(ms["m1"]), py_read_model(ms["m1"])
        assert a.files == b.files
        assert {k: (t.dtype, t.shape, t.file, t.data_offsets) for k, t in a.tensors.items()} == \
               {k: (t.dtype, t.shape, t.file, t.data_offsets) for k, t in b.tensors.items()}


def _edited(src: Path, dst: Path, edit: Any) -> Path:
    from conftest import load_state_dict, save_state_dict

    st = load_state_dict(src)
    edit(st)
    save_state_dict(st, dst)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_donor_tensors_the_base_lacks_are_an_error(related_models: Any, tmp_path: Path) -> None:
    """task_arithmetic of a 2-layer base with a 3-layer donor must not drop the donor's layer."""
    import torch

    ms = related_models("llama", "bfloat16")
    two = _edited(ms["base"], tmp_path / "two", lambda st: [st.pop(k) for k in list(st) if ".layers.2." in k])
    cfg = MergeConfig.from_dict({"merge_method": "task_arithmetic", "base_model": str(two),
                                 "models": [{"model": str(ms["m1"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match=r"has 3 layers but the base model .* has 2.*'model\.layers\.2\."):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)
    # An extra tensor (a bias the base has no counterpart for) is named too.
    extra = _edited(ms["m1"], tmp_path / "extra", lambda st: st.__setitem__(
        "model.layers.0.self_attn.q_proj.bias", torch.zeros(64, dtype=torch.bfloat16)))
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": str(ms["base"]),
                                 "models": [{"model": str(extra), "parameters": {"weight": 1.0}},
                                            {"model": str(ms["m2"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match=r"1 tensors that the base model .* lacks \('model\.layers\.0\."
                                            r"self_attn\.q_proj\.bias'\)"):
        run_merge(cfg, tmp_path / "out")
    # linear (no base): the first model is the reference, the others must not have more.
    cfg = MergeConfig.from_dict({"merge_method": "linear", "models": [
        {"model": str(two), "parameters": {"weight": 1.0}}, {"model": str(ms["m1"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MismatchError, match="has 3 layers but the first model"):
        validate_merge(cfg)
    # slices choosing layers is not dropping them.
    cfg = MergeConfig.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(ms["m1"]), "layer_range": [0, 2]}]}]})
    assert validate_merge(cfg).num_layers == 2
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_threads_capped_at_cores_unless_forced(related_models: Any, tmp_path: Path) -> None:
    from finrecipe.errors import ConfigError
    from finrecipe.merge.run import available_cores, worker_threads

    cores = available_cores()
    assert worker_threads(0) == (0, None)
    assert worker_threads(cores) == (cores, None)
    n, note = worker_threads(10_000 if cores < 1024 else cores + 1, force=False)
    assert n == cores and note is not None and "--force-threads" in note
    assert worker_threads(cores + 1, force=True) == (cores + 1, None)
    with pytest.raises(ConfigError, match="limit of 1024"):
        worker_threads(10_000, force=True)
    ms = related_models("llama", "bfloat16")
    res = run_merge(MergeConfig.from_dict(ta(ms)), tmp_path / "out", threads=10_000)
    assert res.notes and f"using {cores}" in res.notes[0]
    cfg = tmp_path / "m.yml"
    cfg.write_text(json.dumps(ta(ms)))
    r = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "o2"), "--threads", "10000", "-q"])
    assert r.exit_code == 0 and "--force-threads" in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["merge", "--help"])
    assert "--force-threads" in r.output and "capped" in r.output
    r = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "o3"), "--threads", "5000",
                                  "--force-threads", "-q"])
    assert r.exit_code == 2 and "limit of 1024" in r.output and "Traceback" not in r.output


def test_destination_created_during_the_merge_is_not_replaced(related_models: Any, tmp_path: Path) -> None:
    """The existence check and the final rename are one atomic step: a directory that appears while
    the merge runs (another merge won) is left alone and this merge's output discarded."""
    from finrecipe.merge.output import DestinationExists

    ms = related_models("llama", "bfloat16")
    out = tmp_path / "out"

    class Racer:
        def task(self, *a: Any, **k: Any) -> Any:
            class T:
                def update(self, **kw: Any) -> None:
                    if not out.exists():
                        out.mkdir()  # the other merge finishes first (an empty dir is enough)
                        (out / "winner").write_text("x")

                def __enter__(self) -> T:
                    return self

                def __exit__(self, *a: Any) -> None:
                    return None

            return T()

    with pytest.raises(DestinationExists, match="created by another process while this merge ran") as ei:
        run_merge(MergeConfig.from_dict(ta(ms)), out, progress=Racer())
    assert ei.value.exit_code == 1 and "\n" not in str(ei.value)
    assert sorted(p.name for p in out.iterdir()) == ["winner"]
    assert not no_leftovers(tmp_path)
    # An empty directory is not replaced either (plain rename(2) would replace it).
    shutil.rmtree(out)

    class EmptyRacer(Racer):
        def task(self, *a: Any, **k: Any) -> Any:
            t = super().task()
            t.update = lambda **kw: out.mkdir(exist_ok=True)
            return t

    with pytest.raises(DestinationExists):
        run_merge(MergeConfig.from_dict(ta(ms)), out, progress=EmptyRacer())
    assert list(out.iterdir()) == [] and not no_leftovers(tmp_path)


def test_two_concurrent_cli_merges_into_one_dir(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16")
    cfg = tmp_path / "m.yml"
    cfg.write_text(json.dumps(ta(ms)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from finrecipe.cli import main; main()", "merge", str(cfg), str(out), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "already exists" in loser or "created by another process" in loser
    assert "Traceback" not in loser and len(loser.strip().splitlines()) == 1, loser
    assert read_model(out).tensors and not no_leftovers(tmp_path)


def test_stale_temp_dirs_removed_by_lock_not_pid(related_models: Any, tmp_path: Path) -> None:
    """A killed merge's hidden directory is removed by the next merge to the same place, even when
    its pid now belongs to a live process; a live merge's (locked) directory is left alone."""
    import fcntl

    from finrecipe.merge.output import TMP_MARK

    ms = related_models("llama", "bfloat16")
    out = tmp_path / "out"
    dead = tmp_path / f".out{TMP_MARK}1-deadbeef"  # pid 1 is alive: a pid check would keep it
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".out{TMP_MARK}{os.getpid()}-cafecafe"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run_merge(MergeConfig.from_dict(ta(ms)), out)
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)
    run_merge(MergeConfig.from_dict(ta(ms)), tmp_path / "out", overwrite=True)
    assert not live.exists() and not no_leftovers(tmp_path)


def test_read_only_destination_is_an_io_error(related_models: Any, tmp_path: Path) -> None:
    ms = related_models("llama", "bfloat16")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(IoError, match="cannot create the output's parent directory"):
        run_merge(MergeConfig.from_dict(ta(ms)), blocker / "sub" / "out")
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(IoError, match="cannot write the output here"):
            run_merge(MergeConfig.from_dict(ta(ms)), ro / "out")
        cfg = tmp_path / "m.yml"
        cfg.write_text(json.dumps(ta(ms)))
        r = CliRunner().invoke(main, ["merge", str(cfg), str(ro / "out"), "-q"])
        assert r.exit_code == 1 and "Traceback" not in r.output
    finally:
        ro.chmod(0o755)


def _poisoned_index(ms: dict[str, Path], tmp_path: Path) -> Path:
    """A sharded model whose index sends one tensor to ../../other/model.safetensors."""
    bad = tmp_path / "a" / "b" / "bad"
    shutil.copytree(ms["m1"], bad)
    other = tmp_path / "a" / "other"
    other.mkdir(parents=True)
    first = next(bad.glob("model-00001-*.safetensors"))
    shutil.copy(first, other / "model.safetensors")
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    for k, v in idx["weight_map"].items():
        if v == first.name:
            idx["weight_map"][k] = "../../other/model.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    first.unlink()
    return bad


def test_same_hostile_input_same_exit_code_everywhere(related_models: Any, tmp_path: Path) -> None:
    """A corrupt header and an index escaping the model directory: FormatError, exit 2, in the
    library reader, `merge`, `inspect` and `analyze`."""
    ms = related_models("llama", "bfloat16", shard_bytes=60_000)
    escaping = _poisoned_index(ms, tmp_path)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ms["m2"], corrupt)
    _hostile(next(corrupt.glob("model-00002-*.safetensors")), "overlap")
    runner = CliRunner()
    for bad, words in ((escaping, "not a plain file name"), (corrupt, "model-00002")):
        with pytest.raises(FormatError, match=words):
            read_model(bad)
        with pytest.raises(FormatError):
            py_read_model(bad)
        cfg = tmp_path / f"{bad.name}.yml"
        cfg.write_text(json.dumps(ta(ms, bad)))
        runs = {
            "merge": runner.invoke(main, ["merge", str(cfg), str(tmp_path / "never"), "-q"]),
            "inspect": runner.invoke(main, ["inspect", str(bad)]),
            "analyze": runner.invoke(main, ["analyze", "--base", str(ms["base"]), str(ms["m1"]), str(bad),
                                            "--out", str(tmp_path / "an")]),
        }
        for cmd, r in runs.items():
            assert r.exit_code == 2, (cmd, r.output)
            assert words in " ".join(r.output.split()) and "Traceback" not in r.output, (cmd, r.output)
    assert not (tmp_path / "never").exists() and not no_leftovers(tmp_path)


def test_special_files_are_refused_without_hanging(tmp_path: Path) -> None:
    import threading

    d = tmp_path / "fifo"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    errors: list[BaseException] = []

    def read() -> None:
        try:
            read_model(d)
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
            errors.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert len(errors) == 1 and isinstance(errors[0], FormatError) and "not a regular file" in str(errors[0])
    link = tmp_path / "devzero"
    link.mkdir()
    (link / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="not a regular file"):
        read_model(link)
