"""Merge probes inside the trainer: every K steps, score the merge of the live weights.

A probe forms ``base + W·(instruct − base) + (θ_t − base)`` from the live training weights θ_t and
scores it with the merge search's objective (`finrecipe.search.probe.MergeProbe`: held-out domain
bits per byte, agreement with the instruct model's own responses). Only the main process holds
the scoring model; under FSDP2 every process takes part in gathering one parameter at a time
(``DTensor.full_tensor``, an all-gather), and the main process merges it into its scoring copy at
once, so memory is bounded by one full tensor beside the scoring model and τ_I. The scores are
then broadcast, so every process takes the same decisions (early stop).

The probe history (one record per probe) lives in memory, in metrics.jsonl (``probe_*`` keys on
the step's row) and in every training checkpoint's manifest, so a killed run resumes with it.
With ``keep: best`` the best probed weights are exported (as the stage output would be) to
``work/probe/best-step-<N>/`` when they become the best; the run's output is then that directory.
Only directories that the current best or a kept checkpoint's history name are kept.

Ranking: the merge search's selection rule (`finrecipe.search.objective.select`) over the probes
so far; ties go to the earlier probe. A probe improves when it becomes the selected one.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finrecipe.search.objective import InstructionObjective, Scores, SelectRule, feasible, select, utility

log = logging.getLogger("finrecipe.train")

BEST_RE = re.compile(r"^best-step-(\d+)$")


class ProbeSpec(BaseModel):
    """What the trainer needs to probe (resolved by the stage: paths, texts, prompts)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_dir: str
    instruct_dir: str
    instruct: str = "instruct"
    weight: float = 1.0
    every_steps: int = Field(ge=1)
    domain_texts: list[str]
    domain_desc: str = ""
    domain_dataset: str = ""
    max_length: int | None = None
    prompts: list[str] = Field(default_factory=list)
    prompts_name: str | None = None
    instruction: dict[str, Any] | None = None
    select: dict[str, Any] = Field(default_factory=dict)
    keep: Literal["last", "best"] = "last"
    stop_when_no_improvement: int | None = Field(default=None, ge=1)
    batch_tokens: int = 8192
    protected: list[str] = Field(default_factory=list)


def record_scores(rec: dict[str, Any]) -> Scores:
    return Scores(bits_per_byte=float(rec["bits_per_byte"]), agreement=rec.get("agreement"),
                  token_agreement=rec.get("token_agreement"))


def live_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, full tensor) for every parameter; a sharded (DTensor) parameter is all-gathered,
    one at a time, so every process must consume this in the same order."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach()
            yield name, (t.full_tensor() if hasattr(t, "full_tensor") else t)


class Prober:
    """The probe of one training run (on every process; only the main one scores)."""

    def __init__(self, spec: ProbeSpec, work: Path, is_main: bool, device: str) -> None:
        self.spec = spec
        self.rule = SelectRule.model_validate(spec.select)
        self.dir = work / "probe"
        self.is_main = is_main
        self.device = device
        self.history: list[dict[str, Any]] = []
        self.scorer: Any = None
        self.load_seconds = 0.0

    # ------------------------------------------------------------------ setup, state
    def load(self) -> None:
        """The scoring copy, τ_I, the tokenized dev text and the instruct responses (main only)."""
        if not self.is_main:
            return
        from finrecipe.search.probe import MergeProbe

        t0 = time.perf_counter()
        ins = InstructionObjective.model_validate(self.spec.instruction) if self.spec.instruction else None
        self.scorer = MergeProbe.load(self.spec.base_dir, self.spec.instruct_dir, weight=self.spec.weight,
                                      domain_texts=self.spec.domain_texts, prompts=self.spec.prompts,
                                      instruction=ins, device=self.device, max_length=self.spec.max_length)
        self.load_seconds = time.perf_counter() - t0
        log.info("merge probe: instruct %s weight %g, %d dev documents, %d prompts (%.1f s to load)",
                 self.spec.instruct, self.spec.weight, len(self.spec.domain_texts), len(self.spec.prompts),
                 self.load_seconds)

    def state(self) -> dict[str, Any]:
        """What a checkpoint records (its manifest is JSON)."""
        return {"history": [dict(r) for r in self.history], "best_step": self.best_step}

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        """The history of a checkpoint of `step` (records after it are recomputed on replay)."""
        self.history = [dict(r) for r in (state or {}).get("history", []) if int(r["step"]) <= step]
        if self.is_main and self.spec.keep == "best":
            for s, p in self.best_dirs():
                if s > step:  # exported after the checkpoint: replay writes it again
                    shutil.rmtree(p, ignore_errors=True)
            b = self.best_step
            if b is not None and not (self.best_dir(b) / "config.json").is_file():
                from finrecipe.errors import StageError

                raise StageError(f"{self.dir}: the best probed checkpoint (step {b}) that the training "
                                 f"checkpoint of step {step} names is missing; delete {self.dir.parent} "
                                 "to start over")

    # ------------------------------------------------------------------ ranking
    @property
    def best_step(self) -> int | None:
        if not self.history:
            return None
        sel, _met = select([(str(r["step"]), record_scores(r)) for r in self.history], self.rule)
        return int(sel)

    def since_best(self) -> int:
        b = self.best_step
        return 0 if b is None else sum(1 for r in self.history if int(r["step"]) > b)

    def due(self, done: int, total: int) -> bool:
        return done % self.spec.every_steps == 0 or done == total

    def should_stop(self) -> bool:
        n = self.spec.stop_when_no_improvement
        return n is not None and self.since_best() >= n

    # ------------------------------------------------------------------ probing
    def probe(self, model: Any, d: Any, done: int) -> dict[str, Any]:
        """Score the merge of the live weights at step `done` (every process calls this); returns
        the record (the same on every process) and appends it to the history."""
        t0 = time.perf_counter()
        rec: dict[str, Any] | None = None
        if self.is_main:
            s = self.scorer.score(live_tensors(model))
            rec = {"step": done, "bits_per_byte": s.bits_per_byte, "agreement": s.agreement,
                   "token_agreement": s.token_agreement}
        else:
            for _ in live_tensors(model):  # take part in the all-gathers
                pass
        rec = d.broadcast_object(rec)
        assert rec is not None
        sc = record_scores(rec)
        rec["utility"] = utility(sc, self.rule)
        rec["feasible"] = feasible(sc, self.rule)
        rec["seconds"] = time.perf_counter() - t0
        self.history.append(rec)
        rec["best_step"] = self.best_step
        rec["improved"] = rec["best_step"] == done
        return rec

    # ------------------------------------------------------------------ best checkpoint
    def best_dir(self, step: int) -> Path:
        return self.dir / f"best-step-{step}"

    def best_dirs(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = BEST_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def prune(self, referenced: set[int]) -> None:
        """Drop exported best checkpoints that neither the current best nor `referenced` (the
        bests recorded by kept training checkpoints) name."""
        if not self.is_main:
            return
        keep = set(referenced)
        if self.best_step is not None:
            keep.add(self.best_step)
        for s, p in self.best_dirs():
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)


def metrics_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The probe's keys on the step's metrics.jsonl row."""
    return {"probe_bits_per_byte": rec["bits_per_byte"], "probe_agreement": rec["agreement"],
            "probe_token_agreement": rec["token_agreement"], "probe_utility": rec["utility"],
            "probe_feasible": rec["feasible"], "probe_best_step": rec["best_step"],
            "probe_seconds": rec["seconds"]}


def info(rec: dict[str, Any]) -> str:
    """A progress-line fragment."""
    s = f"probe {rec['bits_per_byte']:.4f} bpb"
    if rec.get("agreement") is not None:
        s += f" agr {rec['agreement']:.3f}"
    return s + f" (best @{rec['best_step']})"


__all__ = ["ProbeSpec", "Prober", "info", "live_tensors", "metrics_fields", "record_scores"]
