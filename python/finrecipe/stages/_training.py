"""The stage side of the trainer, shared by `continual_pretraining` and `finetune`.

`TrainingStage` turns a training node into a trainer run: it names the node's inputs, keeps
logging/checkpoint intervals out of the cache key, estimates the output size, loads the input
model's tokenizer, tokenizes the datasets into the shared token cache, writes the run spec
(`finrecipe.train.config.RunSpec`) and hands it to `finrecipe.train.runner.execute`. A kind only
says how its datasets are tokenized (`tokenize`).

Importing this module is light; torch and transformers are imported when a run starts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from finrecipe.errors import ConfigError, StageError
from finrecipe.stages.base import StageKind
from finrecipe.train.config import RUNTIME_ENV, RunSpec, TrainConfig
from finrecipe.types import DatasetRef, InputKind, InputRef, ModelRef, StageContext, StageResult

TC = TypeVar("TC", bound=TrainConfig)

# Settings that change how often things are logged or saved, never the trained weights: they stay
# out of the cache key, so changing them does not retrain.
NOT_IN_KEY = ("log_every", "checkpoint_every_steps", "keep_checkpoints", "keep_checkpoints_after_done")

ARTIFACTS = {"loss_curve": "loss_curve.png", "metrics": "metrics.jsonl"}


class TrainingStage(StageKind[TC]):
    """Shared by the training stage kinds; subclasses implement `tokenize`."""

    label: ClassVar[str]

    def inputs(self, config: TC) -> Sequence[tuple[str, InputKind]]:
        names: list[tuple[str, InputKind]] = [(config.model, "model")]
        names += [(n, "dataset") for n in config.dataset_weights()]
        if config.validation:
            names += [(n, "dataset") for n in config.validation.datasets]
        out: list[tuple[str, InputKind]] = []
        for name, kind in names:
            if (name, kind) not in out:  # a name used as a model and as a dataset stays twice: an error
                out.append((name, kind))
        return out

    def node_rank(self, config: TC) -> int | None:
        if config.launch is None or config.launch.nnodes <= 1:
            return None
        import os

        return config.launch.with_runtime(os.environ).node_rank

    def cache_config(self, config: TC) -> Any:
        d = config.model_dump(mode="json")
        for k in NOT_IN_KEY:
            d.pop(k, None)
        if d.get("launch"):  # per-node runtime settings: every node of a run resolves the same key
            for k in RUNTIME_ENV:
                d["launch"].pop(k, None)
        return d

    def estimate_output_bytes(self, config: TC, inputs: Mapping[str, InputRef]) -> int | None:
        """The output has the input model's tensors in the same dtype: about its safetensors size."""
        ref = inputs.get(config.model)
        if not isinstance(ref, ModelRef) or not ref.path.is_dir():
            return None
        files = list(ref.path.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) if files else None

    def tokenize(self, config: TC, ref: DatasetRef, tokenizer: Any, weight: float | None,
                 ctx: StageContext) -> Any:
        """Tokenize one dataset into the token cache; returns a `finrecipe.train.data.TokenShard`."""
        raise NotImplementedError

    def packing(self, config: TC) -> Literal["documents", "stream"]:
        """How sequences are packed for training (see RunSpec.packing)."""
        return "stream"

    def probe_spec(self, config: TC, inputs: Mapping[str, InputRef], ctx: StageContext) -> dict[str, Any] | None:
        """The merge probe the trainer runs (finrecipe.train.probe.ProbeSpec as JSON), or None."""
        return None

    def run(self, config: TC, inputs: Mapping[str, InputRef], out_dir: Path,
            ctx: StageContext) -> StageResult:
        from finrecipe.train.runner import io_errors

        with io_errors():  # disk full, unwritable cache or output: one line, no traceback
            return self._run(config, inputs, out_dir, ctx)

    def _run(self, config: TC, inputs: Mapping[str, InputRef], out_dir: Path,
             ctx: StageContext) -> StageResult:
        done = _finished(out_dir)
        if done is not None:  # finished before the engine could write its marker
            _drop_checkpoints(config, out_dir)
            return done
        model = inputs[config.model]
        if not isinstance(model, ModelRef):
            raise ConfigError(f"model: {config.model!r} is a dataset, not a model")
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
                out.append(self.tokenize(config, ref, tok, w, ctx).to_json())
            return out

        train_shards = shards(config.dataset_weights())
        val_shards = shards({n: None for n in config.validation.datasets}) if config.validation else []
        train_cfg = config.model_dump(mode="json", include=set(TrainConfig.model_fields))
        if config.launch is not None:
            train_cfg["launch"] = config.launch.with_runtime(os.environ).model_dump(mode="json")
        spec = RunSpec(config=train_cfg, model_dir=str(model.path), out_dir=str(out_dir),
                       train_shards=train_shards, val_shards=val_shards,
                       seed=config.seed if config.seed is not None else 0,
                       title=f"{ctx.node}: {self.label}", trust_remote_code=model.trust_remote_code,
                       packing=self.packing(config), probe=self.probe_spec(config, inputs, ctx))
        from finrecipe.train.runner import execute

        metrics = execute(spec, ctx.progress, ctx.logger)
        _drop_checkpoints(config, out_dir)
        return StageResult(model_dir=out_dir / "model", metrics=metrics, artifacts=dict(ARTIFACTS))


def _finished(out_dir: Path) -> StageResult | None:
    res = out_dir / "work" / "result.json"
    if (out_dir / "model" / "config.json").is_file() and res.is_file():
        return StageResult(model_dir=out_dir / "model", metrics=json.loads(res.read_text()),
                           artifacts=dict(ARTIFACTS))
    return None


def _drop_checkpoints(config: TrainConfig, out_dir: Path) -> None:
    """A finished node keeps its model, not its training checkpoints (12 bytes per parameter
    each), unless `keep_checkpoints_after_done`."""
    ckpt = out_dir / "work" / "ckpt"
    if not config.keep_checkpoints_after_done and ckpt.is_dir():
        shutil.rmtree(ckpt, ignore_errors=True)
    probe = out_dir / "work" / "probe"  # exported best probed checkpoints (the kept one is model/)
    if not config.keep_checkpoints_after_done and probe.is_dir():
        shutil.rmtree(probe, ignore_errors=True)
