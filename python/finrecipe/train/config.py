"""The trainer's settings (shared by `continual_pretraining` and `finetune`) and the run spec.

Pure pydantic: importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finrecipe.errors import ConfigError
from finrecipe.train.schedule import ScheduleConfig


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)


class ValidationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Held-out share of each training dataset's sequences, or separate datasets (names), or both.
    fraction: float = Field(default=0.0, ge=0, lt=1)
    datasets: list[str] = Field(default_factory=list)
    every_steps: int | None = Field(default=None, ge=1)  # None: only at the end
    max_sequences: int = Field(default=256, ge=1)


class LaunchConfig(BaseModel):
    """torchrun settings. ``node_rank``, ``master_addr`` and ``master_port`` differ between the
    nodes of one run: they are runtime settings, outside the cache key, and the environment
    (FINRECIPE_NODE_RANK, FINRECIPE_MASTER_ADDR, FINRECIPE_MASTER_PORT) overrides them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    nproc_per_node: int = Field(default=1, ge=1)
    nnodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(default=29500, ge=1, le=65535)
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    def with_runtime(self, env: Mapping[str, str]) -> LaunchConfig:
        """These settings with the per-node ones taken from `env` where it sets them."""
        upd: dict[str, Any] = {}
        for key, var in RUNTIME_ENV.items():
            if env.get(var):
                upd[key] = env[var]
        try:
            return LaunchConfig.model_validate({**self.model_dump(), **upd})
        except ValueError as e:
            raise ConfigError(f"launch settings from the environment ({', '.join(RUNTIME_ENV.values())}) "
                              f"are not valid: {e}") from None


# Per-node launch settings: runtime, not part of what a node produces.
RUNTIME_ENV = {"node_rank": "FINRECIPE_NODE_RANK", "master_addr": "FINRECIPE_MASTER_ADDR",
               "master_port": "FINRECIPE_MASTER_PORT"}


class TrainConfig(BaseModel):
    """Settings of one training run. Either ``epochs`` or ``max_tokens`` (default: 1 epoch).

    Global batch (a property of the recipe, the same on any number of processes):
    ``global_batch_tokens``, or by default ``micro_batch_size × grad_accum`` sequences. Each
    process runs micro-batches of at most ``micro_batch_size`` sequences and accumulates the rest
    of its share (see finrecipe.train.trainer.batch_plan)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    datasets: list[str] | dict[str, float]
    seq_len: int = Field(default=2048, ge=2)
    epochs: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    micro_batch_size: int = Field(default=1, ge=1)
    grad_accum: int | None = Field(default=None, ge=1)
    global_batch_tokens: int | None = Field(default=None, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(default=1.0, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int | None = None
    validation: ValidationConfig | None = None
    checkpoint_every_steps: int | None = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    keep_checkpoints_after_done: bool = False  # default: removed once the model is written
    log_every: int = Field(default=1, ge=1)
    launch: LaunchConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.epochs is not None and self.max_tokens is not None:
            raise ValueError("give epochs or max_tokens, not both")
        if self.grad_accum is not None and self.global_batch_tokens is not None:
            raise ValueError("give grad_accum or global_batch_tokens, not both")
        if isinstance(self.datasets, list) and not self.datasets:
            raise ValueError("datasets: name at least one dataset")
        return self

    def dataset_weights(self) -> dict[str, float | None]:
        """Dataset name → weight given in the stage (None: use the dataset's own weight)."""
        if isinstance(self.datasets, dict):
            return dict(self.datasets)
        return {n: None for n in self.datasets}


class RunSpec(BaseModel):
    """Everything a training process needs; written to a JSON file for torchrun workers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    config: dict[str, Any]
    model_dir: str
    out_dir: str
    train_shards: list[dict[str, Any]]
    val_shards: list[dict[str, Any]] = Field(default_factory=list)
    seed: int = 0
    title: str = "training"
    # "documents": positions restart and attention stays within each document of a packed
    # sequence (continual pretraining's default); "stream": one causal stream across documents.
    packing: Literal["documents", "stream"] = "stream"
    # Whether the model directory's own code may run; only ever from the input's ModelRef, which
    # the engine sets when the person running `apply` allowed it.
    trust_remote_code: bool = False
    # The merge probe (finrecipe.train.probe.ProbeSpec as JSON), or None.
    probe: dict[str, Any] | None = None
