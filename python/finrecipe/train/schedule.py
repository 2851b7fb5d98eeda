"""Learning-rate schedules as pure functions of the step (so the scheduler's state is the step).

Every schedule warms up linearly from 0 over ``warmup`` steps to the peak, then:
- ``constant``: stays at the peak;
- ``linear``: decays linearly to ``min_lr_ratio`` × peak at the last step;
- ``cosine``: half-cosine to ``min_lr_ratio`` × peak at the last step;
- ``wsd`` (warmup-stable-decay): stays at the peak, then decays linearly to the minimum over the
  last ``decay_ratio`` of the steps.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from finrecipe.errors import ConfigError


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    decay_ratio: float = Field(default=0.2, gt=0, le=1)


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        raise ConfigError("schedule: give warmup_steps or warmup_ratio, not both")
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return int(round(cfg.warmup_ratio * total_steps))
    return 0


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return (step + 1) / (w + 1)
    lo = cfg.min_lr_ratio
    if cfg.kind == "constant":
        return 1.0
    last = max(total_steps - 1, 1)
    if cfg.kind == "wsd":
        decay_start = max(w, int(round(total_steps * (1 - cfg.decay_ratio))))
        if step < decay_start:
            return 1.0
        span = max(last - decay_start, 1)
        p = min((step - decay_start) / span, 1.0)
        return 1.0 - (1.0 - lo) * p
    span = max(last - w, 1)
    p = min(max((step - w) / span, 0.0), 1.0)
    if cfg.kind == "linear":
        return 1.0 - (1.0 - lo) * p
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
