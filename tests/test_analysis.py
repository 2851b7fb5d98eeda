"""Task-vector analysis figures against a plain torch reference (whole state dicts in float64)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import load_state_dict  # noqa: E402
from finrecipe.analysis import analyze, split_name  # noqa: E402


def _deltas(dirs: dict[str, Path], names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    base = load_state_dict(dirs["base"])
    out = {}
    for n in names:
        sd = load_state_dict(dirs[n])
        out[n] = {k: sd[k].double() - base[k].double() for k in base}
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("dtype,shard", [("float32", None), ("bfloat16", 20000)])
def test_figures_equal_torch_reference(related_models: Callable[..., dict[str, Path]], tmp_path: Path,
                                       dtype: str, shard: int | None) -> None:
    dirs = related_models("llama", dtype=dtype, n=3, scale=0.02, shard_bytes=shard)
    names = ["m1", "m2", "m3"]
    fig = analyze(dirs["base"], [dirs[n] for n in names], out_dir=tmp_path / "an",
                  names=["base", *names])
    d = _deltas(dirs, names)
    flat = {n: torch.cat([v.flatten() for v in d[n].values()]) for n in names}
    assert len(fig["pairs"]) == 3
    for p in fig["pairs"]:
        a, b = flat[p["a"]], flat[p["b"]]
        assert p["cosine"] == pytest.approx(_cos(a, b), abs=1e-7)
        assert p["norm_a"] == pytest.approx(float(a.norm()), rel=1e-7)
        assert p["norm_b"] == pytest.approx(float(b.norm()), rel=1e-7)
    # per tensor
    name = "model.layers.1.self_attn.q_proj.weight"
    t = fig["tensors"][name]
    assert t["cosines"]["m1|m3"] == pytest.approx(_cos(d["m1"][name], d["m3"][name]), abs=1e-7)
    assert t["norms"][1] == pytest.approx(float(d["m2"][name].norm()), rel=1e-7)
    # per layer: all tensors of layer 0 together
    l0 = [k for k in d["m1"] if split_name(k)[0] == 0]
    a0 = torch.cat([d["m1"][k].flatten() for k in l0])
    b0 = torch.cat([d["m2"][k].flatten() for k in l0])
    assert fig["per_layer"]["0"]["cosines"]["m1|m2"] == pytest.approx(_cos(a0, b0), abs=1e-7)
    # heatmap cell (layer 2, mlp.down_proj)
    h = fig["heatmap"]
    li, mi = h["layers"].index(2), h["modules"].index("mlp.down_proj")
    k = "model.layers.2.mlp.down_proj.weight"
    assert h["cosine"]["m2|m3"][li][mi] == pytest.approx(_cos(d["m2"][k], d["m3"][k]), abs=1e-7)
    # files
    saved = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert saved["pairs"][0]["cosine"] == pytest.approx(fig["pairs"][0]["cosine"])
    assert len(saved["heatmaps"]) == 3
    for p in saved["heatmaps"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_vectors_have_cosine_one_and_zero_vector_none(related_models: Callable[..., dict[str, Path]],
                                                                 tmp_path: Path) -> None:
    dirs = related_models("llama", n=1, scale=0.05)
    fig = analyze(dirs["base"], [dirs["m1"], dirs["m1"]], names=["base", "a", "b"])
    assert fig["pairs"][0]["cosine"] == pytest.approx(1.0, abs=1e-12)
    fig0 = analyze(dirs["base"], [dirs["base"], dirs["m1"]], names=["base", "zero", "m1"])
    assert fig0["pairs"][0]["cosine"] is None and fig0["pairs"][0]["norm_a"] == 0.0
    assert not math.isnan(fig0["pairs"][0]["norm_b"])


def test_split_name() -> None:
    assert split_name("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert split_name("gpt_neox.layers.0.attention.dense.bias") == (0, "attention.dense")
    assert split_name("model.embed_tokens.weight") == (None, "model.embed_tokens")


def test_shape_mismatch_is_an_error(tiny_model: Callable[..., Path], related_models: Callable[..., dict[str, Path]]
                                    ) -> None:
    from finrecipe.errors import MismatchError

    dirs = related_models("llama", n=1)
    with pytest.raises(MismatchError, match="tensor"):
        analyze(dirs["base"], [dirs["m1"], tiny_model("gpt_neox")])


def test_analyze_cli(related_models: Callable[..., dict[str, Path]], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from finrecipe.cli import main

    dirs = related_models("llama", n=2)
    res = CliRunner().invoke(main, ["analyze", "--base", str(dirs["base"]), str(dirs["m1"]), str(dirs["m2"]),
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "m1 × m2" in res.output and (tmp_path / "o" / "heatmap_0.png").is_file()


def test_rust_core_equals_torch_reference(related_models: Callable[..., dict[str, Path]]) -> None:
    from finrecipe.analysis import build_plan, run_plan
    from finrecipe.progress import NullProgress
    from reference.analysis import python_analyze

    dirs = related_models("llama", dtype="bfloat16", n=2, scale=0.02, shard_bytes=20000)
    plan = build_plan(dirs["base"], [dirs["m1"], dirs["m2"]])
    core, py = run_plan(plan), python_analyze(plan, NullProgress())
    assert set(core["tensors"]) == set(py["tensors"])
    for name, t in py["tensors"].items():
        assert core["tensors"][name]["numel"] == t["numel"]
        for i in range(2):
            for j in range(2):
                assert core["tensors"][name]["gram"][i][j] == pytest.approx(t["gram"][i][j], rel=1e-6, abs=1e-12)
