"""Training at scale: the global batch is the recipe's, per-node launch settings are runtime (one
key and one output for every node), checkpoints go when a node is done, document-masked packing,
validation by document, bounded tokenization memory, and a launcher that owns its workers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finrecipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_train import BASE_CFG, _corpus, _metrics, _run  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


# ---------------------------------------------------------------------------------- global batch
@pytest.mark.parametrize(("cfg", "world", "want"), [
    ({"micro_batch_size": 4, "grad_accum": 2}, 1, (4, 2, 8)),
    ({"micro_batch_size": 4, "grad_accum": 2}, 2, (4, 1, 8)),
    ({"micro_batch_size": 4, "grad_accum": 2}, 4, (2, 1, 8)),
    ({"micro_batch_size": 4, "grad_accum": 2}, 8, (1, 1, 8)),
    ({"micro_batch_size": 3, "global_batch_tokens": 12 * 32}, 2, (3, 2, 12)),
    ({"micro_batch_size": 4, "global_batch_tokens": 12 * 32}, 2, (3, 2, 12)),  # 6 = 3 × 2, not 4 + 2
    ({"micro_batch_size": 1, "global_batch_tokens": 12 * 32}, 3, (1, 4, 12)),
])
def test_global_batch_is_the_recipes_whatever_the_processes(cfg: dict[str, Any], world: int,
                                                            want: tuple[int, int, int]) -> None:
    from finrecipe.train.config import TrainConfig
    from finrecipe.train.trainer import batch_plan

    c = TrainConfig.model_validate({"model": "m", "datasets": ["d"], "seq_len": 32, **cfg})
    assert batch_plan(c, world) == want


def test_global_batch_that_cannot_be_split_is_a_clear_error() -> None:
    from finrecipe.train.config import TrainConfig
    from finrecipe.train.trainer import batch_plan

    c = TrainConfig.model_validate({"model": "m", "datasets": ["d"], "seq_len": 32, "micro_batch_size": 3})
    with pytest.raises(ConfigError, match=r"global batch of 3 sequences \(96 tokens\) cannot be split evenly "
                                          r"over 2 processes; set global_batch_tokens to a multiple of "
                                          r"seq_len × processes = 32 × 2 \(e.g. 128\)"):
        batch_plan(c, 2)


# ------------------------------------------------------------------------- runtime launch settings
def _recipe(root: Path, model: Path, corpus: Path, launch: dict[str, Any]) -> Path:
    p = root / f"recipe-{len(list(root.glob('recipe-*')))}.yaml"
    p.write_text(json.dumps({
        "finrecipe": 1, "name": "nodes", "workdir": str(root / "work"),
        "models": {"base": {"path": str(model)}},
        "datasets": {"corpus": {"files": str(corpus)}},
        "stages": {"cpt": {"type": "continual_pretraining", "model": "base", "datasets": ["corpus"],
                           "seq_len": 32, "launch": launch}},
    }))
    return p


def test_two_nodes_resolve_the_same_key(tiny_model: Callable[..., Path], corpus: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """node_rank, master address and port are per-node runtime settings: node 0 and node 1 of a
    two-node run (in the recipe or from the environment) resolve one key, hence one output dir."""
    import finrecipe

    def key(launch: dict[str, Any], env: dict[str, str]) -> str:
        for var in ("FINRECIPE_NODE_RANK", "FINRECIPE_MASTER_ADDR", "FINRECIPE_MASTER_PORT"):
            monkeypatch.delenv(var, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        r = finrecipe.load_recipe(_recipe(tmp_path, tiny_model("llama"), corpus, launch))
        return next(n.key for n in r.plan().nodes if n.name == "cpt")

    two = {"nproc_per_node": 2, "nnodes": 2}
    k0 = key({**two, "node_rank": 0, "master_addr": "10.0.0.1", "master_port": 29500}, {})
    k1 = key({**two, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500}, {})
    k_env = key(two, {"FINRECIPE_NODE_RANK": "1", "FINRECIPE_MASTER_ADDR": "node0", "FINRECIPE_MASTER_PORT": "29600"})
    k_port = key({**two, "master_port": 31000}, {})
    assert k0 == k1 == k_env == k_port
    assert key({"nproc_per_node": 2, "nnodes": 1}, {}) != k0  # the shape of the run stays in the key


def test_runtime_launch_settings_come_from_the_environment() -> None:
    from finrecipe.train.config import LaunchConfig

    la = LaunchConfig(nproc_per_node=8, nnodes=2)
    got = la.with_runtime({"FINRECIPE_NODE_RANK": "1", "FINRECIPE_MASTER_ADDR": "node0",
                           "FINRECIPE_MASTER_PORT": "29600"})
    assert (got.node_rank, got.master_addr, got.master_port, got.nproc_per_node) == (1, "node0", 29600, 8)
    assert la.with_runtime({}) == la
    with pytest.raises(ConfigError, match="FINRECIPE_NODE_RANK.*not valid"):
        la.with_runtime({"FINRECIPE_NODE_RANK": "first"})


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_kept_after_done_only_when_asked(tiny_model: Callable[..., Path], corpus: Path,
                                                     tmp_path: Path) -> None:
    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 4, "checkpoint_every_steps": 1, "keep_checkpoints_after_done": True}
    _run("continual_pretraining", cfg, tiny_model("llama"), corpus, tmp_path / "keep", tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "keep" / "work" / "ckpt").iterdir()) == ["step-2", "step-3"]
    assert [r["step"] for r in _metrics(tmp_path / "keep") if "loss" in r] == [1, 2, 3, 4]
    # A rerun of the finished node drops them once the option is off (it is not in the cache key).
    _run("continual_pretraining", {**cfg, "keep_checkpoints_after_done": False}, tiny_model("llama"), corpus,
         tmp_path / "keep", tmp_path / "cache")
    assert not (tmp_path / "keep" / "work" / "ckpt").exists()
    assert (tmp_path / "keep" / "model" / "model.safetensors").is_file()
