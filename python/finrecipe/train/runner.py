"""What the training stages share: tokenize inputs, then train in-process or under torchrun.

Importing this module is light; torch and transformers are imported when a run starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finrecipe.errors import ConfigError, StageError
from finrecipe.stages.base import DatasetRef, ModelRef, StageContext, StageResult
from finrecipe.train.config import RunSpec, TrainConfig

# (dataset, tokenizer, weight) -> token shard
Tokenize = Callable[[DatasetRef, Any, "float | None"], Any]

ARTIFACTS = {"loss_curve": "loss_curve.png", "metrics": "metrics.jsonl"}


def training_inputs(cfg: TrainConfig) -> list[tuple[str, str]]:
    names: list[tuple[str, str]] = [(cfg.model, "model")]
    names += [(n, "dataset") for n in cfg.dataset_weights()]
    if cfg.validation:
        names += [(n, "dataset") for n in cfg.validation.datasets]
    seen: set[str] = set()
    return [x for x in names if not (x[0] in seen or seen.add(x[0]))]  # type: ignore[func-returns-value]


def estimate_model_bytes(cfg: TrainConfig, inputs: Mapping[str, ModelRef | DatasetRef]) -> int | None:
    """The output has the input model's tensors in the same dtype: about its safetensors size."""
    ref = inputs.get(cfg.model)
    if not isinstance(ref, ModelRef) or not ref.path.is_dir():
        return None
    files = list(ref.path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _result(out_dir: Path) -> StageResult | None:
    res = out_dir / "work" / "result.json"
    if (out_dir / "model" / "config.json").is_file() and res.is_file():
        return StageResult(model_dir=out_dir / "model", metrics=json.loads(res.read_text()),
                           artifacts=dict(ARTIFACTS))
    return None


def run_training(cfg: TrainConfig, inputs: Mapping[str, ModelRef | DatasetRef], out_dir: Path,
                 ctx: StageContext, tokenize: Tokenize, title: str) -> StageResult:
    done = _result(out_dir)
    if done is not None:  # finished before the engine could write its marker
        return done
    model = inputs[cfg.model]
    if not isinstance(model, ModelRef):
        raise ConfigError(f"model: {cfg.model!r} is a dataset, not a model")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise StageError(f"{model.path}: cannot load the tokenizer: {e}") from None

    def shards(names: Mapping[str, float | None]) -> list[dict[str, Any]]:
        out = []
        for name, w in names.items():
            ref = inputs[name]
            if not isinstance(ref, DatasetRef):
                raise ConfigError(f"datasets: {name!r} is a model, not a dataset")
            out.append(tokenize(ref, tok, w).to_json())
        return out

    train_shards = shards(cfg.dataset_weights())
    val_shards = shards({n: None for n in cfg.validation.datasets}) if cfg.validation else []
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    train_cfg = cfg.model_dump(mode="json", include=set(TrainConfig.model_fields))
    spec = RunSpec(config=train_cfg, model_dir=str(model.path), out_dir=str(out_dir),
                   train_shards=train_shards, val_shards=val_shards, seed=seed, title=title)
    (out_dir / "work").mkdir(parents=True, exist_ok=True)
    if cfg.launch is None:
        from finrecipe.train.trainer import train

        metrics = train(spec, ctx.progress)
    else:
        metrics = _torchrun(cfg, spec, out_dir, ctx)
    return StageResult(model_dir=out_dir / "model", metrics=metrics, artifacts=dict(ARTIFACTS))


def torchrun_command(cfg: TrainConfig, spec_path: Path) -> list[str]:
    la = cfg.launch
    assert la is not None
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={la.nproc_per_node}", f"--nnodes={la.nnodes}", f"--node_rank={la.node_rank}",
            f"--master_addr={la.master_addr}", f"--master_port={la.master_port}",
            "-m", "finrecipe.train.launch", str(spec_path)]


def _torchrun(cfg: TrainConfig, spec: RunSpec, out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    work = out_dir / "work"
    spec_path = work / "launch.json"
    spec_path.write_text(spec.model_dump_json(indent=1))
    log_path = work / "torchrun.log"
    metrics_path = out_dir / "metrics.jsonl"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = torchrun_command(cfg, spec_path)
    ctx.logger.info("launching: %s", " ".join(cmd))
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        old = None

        def forward(signum: int, frame: Any) -> None:  # torchrun passes SIGTERM on to the workers
            proc.send_signal(signal.SIGTERM)

        try:
            old = signal.signal(signal.SIGTERM, forward)
        except ValueError:  # not the main thread
            old = None
        try:
            with ctx.progress.task(spec.title, total=None, unit="step") as task:
                seen = 0
                while True:
                    rc = proc.poll()
                    if metrics_path.exists():
                        lines = metrics_path.read_text().splitlines()
                        for ln in lines[seen:]:
                            try:
                                rec = json.loads(ln)
                            except json.JSONDecodeError:
                                break
                            task.update(completed=rec.get("step", 0),
                                        info=f"loss {rec['loss']:.4f}" if "loss" in rec else None)
                            seen += 1
                    if rc is not None:
                        break
                    time.sleep(0.5)
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        errs = [ln for ln in tail if ln.startswith("error: ")]
        msg = errs[-1][len("error: "):] if errs else "\n".join(tail)
        raise StageError(f"torchrun exited with code {rc} (log: {log_path}): {msg}")
    res = work / "result.json"
    if not res.is_file():
        raise StageError(f"torchrun finished but wrote no {res}; see {log_path}")
    return dict(json.loads(res.read_text()))
