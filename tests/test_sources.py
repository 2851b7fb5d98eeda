"""Model and dataset sources as vendors ship them: the Hugging Face cache (real huggingface_hub,
offline), pickle-only checkpoints converted safely, and what is refused."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import load_state_dict
from finrecipe import load_recipe
from finrecipe.cli import main
from finrecipe.errors import FormatError, IoError, RecipeError
from finrecipe.sources.convert import convert_pickle_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hf_cache(root: Path, repo: str, model_dir: Path, repo_type: str = "model") -> Path:
    """huggingface_hub's cache layout: blobs + a snapshot of symlinks + a ref."""
    repo_dir = root / f"{repo_type}s--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for i, f in enumerate(sorted(p for p in model_dir.iterdir() if p.is_file())):
        blob = repo_dir / "blobs" / f"blob{i:04d}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def _to_pickles(model_dir: Path, out: Path, *, shards: int = 1) -> Path:
    """A pickle-only copy of `model_dir` (what older checkpoints look like)."""
    out.mkdir(parents=True)
    sd = load_state_dict(model_dir)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            (out / f.name).write_bytes(f.read_bytes())
    if shards == 1:
        torch.save(sd, out / "pytorch_model.bin")
        return out
    names = list(sd)
    per = -(-len(names) // shards)
    wmap = {}
    for i in range(shards):
        fn = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i * per:(i + 1) * per]}
        torch.save(part, out / fn)
        wmap.update(dict.fromkeys(part, fn))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return out


def test_convert_keeps_names_dtypes_and_shards(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama", "bfloat16")
    pk = _to_pickles(src, tmp_path / "pk", shards=3)
    res = CliRunner().invoke(main, ["convert", str(pk), str(tmp_path / "st")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "st"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want, got = load_state_dict(src), load_state_dict(out)
    assert set(index["weight_map"]) == set(want) == set(got)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads where the original loaded
    # the destination exists: refused unless --overwrite
    res = CliRunner().invoke(main, ["convert", str(pk), str(out)])
    assert res.exit_code == 1 and "--overwrite" in res.output


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_convert_refuses_pickles_that_run_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "evil"
    d.mkdir()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Boom()}, f)
    with pytest.raises(FormatError, match="run code"):
        convert_pickle_model(d, tmp_path / "out")
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    torch.save({"w": torch.zeros(2), "step": 3}, d / "pytorch_model.bin")
    with pytest.raises(FormatError, match="'step' is a int, not a tensor"):
        convert_pickle_model(d, tmp_path / "out")


def _recipe(tmp: Path, models: str) -> Path:
    p = tmp / "r.yaml"
    p.write_text(f"finrecipe: 1\nname: s\nmodels:\n{models}\n"
                 "stages:\n  m:\n    type: merge\n    merge_method: linear\n"
                 "    models: [{model: a, parameters: {weight: 1.0}}]\n    dtype: float32\n")
    return p


def test_pickle_path_source_needs_opt_in_and_converts_once(tiny_model: Callable[..., Path],
                                                           tmp_path: Path) -> None:
    pk = _to_pickles(tiny_model("llama"), tmp_path / "pk")
    with pytest.raises(RecipeError, match="allow_pickle: true"):
        load_recipe(_recipe(tmp_path, f"  a: {{path: {pk}}}")).plan()
    r = load_recipe(_recipe(tmp_path, f"  a: {{path: {pk}, allow_pickle: true}}"))
    res = r.apply()
    assert res.ran == ["a", "m"]
    conv = next(n for n in res.nodes if n.name == "a").model_dir
    assert conv is not None and (conv / "model.safetensors").is_file()
    got, want = load_state_dict(res.nodes[-1].model_dir), load_state_dict(tiny_model("llama"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert load_recipe(_recipe(tmp_path, f"  a: {{path: {pk}, allow_pickle: true}}")).apply().noop


def test_hub_model_from_the_hf_cache_offline(tiny_model: Callable[..., Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf"
    snap = _fake_hf_cache(cache, "org/tiny", tiny_model("llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    p = _recipe(tmp_path, f"  a: {{hub: org/tiny, revision: {COMMIT}}}")
    res = load_recipe(p).apply()
    assert res.ran == ["a", "m"]
    a = next(n for n in res.nodes if n.name == "a")
    assert a.model_dir == snap  # no second copy in the workdir
    assert not any((a.out_dir or tmp_path).rglob("*.safetensors"))
    assert load_recipe(p).apply().noop
    lock = (tmp_path / "r.yaml.lock").read_text()
    assert COMMIT in lock
    # a commit the cache does not hold: a one-line error that says why
    other = "f" * 40
    p2 = _recipe(tmp_path, f"  a: {{hub: org/tiny, revision: {other}}}")
    with pytest.raises(IoError, match="HF_HUB_OFFLINE"):
        load_recipe(p2).apply()


def test_links_out_of_a_model_directory_are_refused(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_model("llama").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "extra.json").symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="extra.json: a symbolic link"):
        load_recipe(_recipe(tmp_path, f"  a: {{path: {d}}}")).plan()
    (d / "extra.json").unlink()
    import os

    os.mkfifo(d / "fifo.json")
    with pytest.raises(FormatError, match="fifo.json: not a regular file"):
        load_recipe(_recipe(tmp_path, f"  a: {{path: {d}}}")).plan()


def test_a_path_source_may_be_a_hf_cache_snapshot(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    snap = _fake_hf_cache(tmp_path / "hf", "org/tiny", tiny_model("llama"))
    res = load_recipe(_recipe(tmp_path, f"  a: {{path: {snap}}}")).apply()
    assert res.ran == ["m"]
    # but a link of a snapshot that leaves its repository's blobs is refused
    (snap / "evil.json").symlink_to(tmp_path / "r.yaml")
    with pytest.raises(FormatError, match="evil.json: a symbolic link"):
        load_recipe(_recipe(tmp_path, f"  a: {{path: {snap}}}")).plan()


def test_an_index_entry_outside_the_model_directory_is_refused(tiny_model: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_model("llama").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (tmp_path / "other").mkdir()
    (d / "model.safetensors").rename(tmp_path / "other" / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "other" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(names, "../other/model.safetensors")}))
    res = CliRunner().invoke(main, ["plan", str(_recipe(tmp_path, f"  a: {{path: {d}}}"))])
    assert res.exit_code == 2 and "model.safetensors.index.json" in res.output, res.output
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # a hostile header
    res = CliRunner().invoke(main, ["plan", str(_recipe(tmp_path, f"  a: {{path: {d}}}"))])
    assert res.exit_code == 2 and "model.safetensors" in res.output and "Traceback" not in res.output
