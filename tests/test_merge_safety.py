"""Hostile inputs, interrupted merges and the CLI's exit codes: nothing half-written is ever left."""

from __future__ import annotations

import json
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
from finrecipe.errors import FormatError, IoError
from finrecipe.merge import MergeConfig, read_model, run_merge
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
