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


# ------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _procs_with(text: str) -> list[int]:
    """Pids whose command line mentions `text` (our run's spec path)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out.append(int(p.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_apply_leaves_no_workers_and_reapply_has_no_duplicate_steps(
        tiny_model: Callable[..., Path], corpus: Path, tmp_path: Path) -> None:
    """`apply` (here: a process running the stage) launches 2 gloo workers under torchrun and is
    SIGKILLed mid-run: torchrun and both workers go with it; running again resumes from the last
    checkpoint and every step appears once in metrics.jsonl."""
    import os
    import signal
    import subprocess
    import textwrap
    import time

    cfg = {**BASE_CFG, "max_tokens": 32 * 4 * 60, "checkpoint_every_steps": 2,
           "launch": {"nproc_per_node": 2, "master_port": _free_port()}}
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from pathlib import Path
        from test_train import _run
        from finrecipe.progress import NullProgress

        class Kill(NullProgress):
            def task(self, description, total=None, unit="it"):
                class T:
                    def update(self, *, completed=None, **kw):
                        if unit == "step" and completed is not None and completed >= 5:
                            os.kill(os.getpid(), signal.SIGKILL)
                    def __enter__(self): return self
                    def __exit__(self, *a): return None
                return T()

        _run("continual_pretraining", json.loads({json.dumps(cfg)!r}), Path({str(tiny_model('llama'))!r}),
             Path({str(corpus)!r}), Path({str(out)!r}), Path({str(tmp_path / 'cache')!r}), progress=Kill())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    spec = str(out / "work" / "launch.json")
    deadline = time.monotonic() + 10
    while _procs_with(spec) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _procs_with(spec)
    for pid in left:  # do not leave them running if the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], "torchrun or its workers outlived the launcher"
    steps_before = [r["step"] for r in _metrics(out) if "loss" in r]
    assert 5 <= len(steps_before) < 60
    res = _run("continual_pretraining", {**cfg, "launch": {**cfg["launch"], "master_port": _free_port()}},
               tiny_model("llama"), corpus, out, tmp_path / "cache")
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, 61))
    assert res.metrics["steps"] == 60 and res.metrics["world_size"] == 2
    assert "resuming from step" in (out / "work" / "torchrun.log").read_text()


def test_a_new_launch_waits_for_surviving_workers(tmp_path: Path) -> None:
    """A worker of an earlier launch still holding the run's worker lock blocks a new launch,
    which says so instead of training a second copy into the same directory."""
    import subprocess

    from finrecipe.errors import StageError
    from finrecipe.train import runner
    from finrecipe.train.config import RunSpec

    work = tmp_path / "out" / "work"
    work.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from finrecipe.train.runner import "
                               f"hold_worker_lock; hold_worker_lock(Path({str(work)!r})); print('ok', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        spec = RunSpec(config={**BASE_CFG, "launch": {"nproc_per_node": 2}}, model_dir="m",
                       out_dir=str(tmp_path / "out"), train_shards=[])
        old = runner.ORPHAN_WAIT_S
        runner.ORPHAN_WAIT_S = 0.5
        try:
            with pytest.raises(StageError, match="workers of an earlier launch are still running"):
                runner.execute(spec)
        finally:
            runner.ORPHAN_WAIT_S = old
        assert not (work / "launch.json").exists()  # nothing was launched
    finally:
        holder.kill()
        holder.wait()
