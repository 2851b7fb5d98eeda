"""The trainer: one loop for single-process and FSDP2 runs, resumable, deterministic on CPU.

Per optimizer step ``s`` the global batch is ``order[s·B:(s+1)·B]`` (``B`` sequences, see
data.build_order). Rank ``r`` runs micro-batch ``m`` on ``order[s·B + (m·world + r)·mb …]``, so
the same sequences make a step whatever the number of processes. The loss of a step is the sum of
token losses over the global batch divided by its number of target tokens (computed up front and
all-reduced), so gradient accumulation and sharding give the gradient of that one mean.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finrecipe.errors import ConfigError, DataError, StageError
from finrecipe.progress import NullProgress, Progress
from finrecipe.train import distributed as tdist
from finrecipe.train import probe as tprobe
from finrecipe.train.checkpoint import Checkpointer
from finrecipe.train.config import RunSpec, TrainConfig
from finrecipe.train.data import SequenceSet, TokenShard, build_order, split_documents, split_heldout
from finrecipe.train.metrics import MetricsLog, mfu, model_flops_per_token, peak_flops, plot_loss_curve
from finrecipe.train.schedule import lr_factor
from finrecipe.util.fs import atomic_dir, write_json_atomic

log = logging.getLogger("finrecipe.train")

SHARD_BYTES = 5 * 1024**3


class _StopFlag:
    """Set by SIGTERM; the loop checkpoints at the end of the step and stops."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def batch_plan(cfg: TrainConfig, world: int) -> tuple[int, int, int]:
    """(micro-batch per device, accumulation steps, global batch in sequences).

    The global batch is a property of the recipe: ``global_batch_tokens``, or by default
    ``micro_batch_size × grad_accum`` sequences (what one device would run). It is the same on any
    number of processes: each takes ``global / world`` sequences per step, in micro-batches of at
    most ``micro_batch_size`` (the largest size that divides its share) and accumulates the rest."""
    if cfg.global_batch_tokens is not None:
        seqs, rem = divmod(cfg.global_batch_tokens, cfg.seq_len)
        if seqs == 0 or rem:
            raise ConfigError(f"global_batch_tokens={cfg.global_batch_tokens} must be a multiple of "
                              f"seq_len={cfg.seq_len}")
    else:
        seqs = cfg.micro_batch_size * (cfg.grad_accum or 1)
    if seqs % world:
        raise ConfigError(
            f"the global batch of {seqs} sequences ({seqs * cfg.seq_len} tokens) cannot be split evenly "
            f"over {world} processes; set global_batch_tokens to a multiple of seq_len × processes = "
            f"{cfg.seq_len} × {world} (e.g. {(seqs // world + 1) * world * cfg.seq_len})")
    per = seqs // world
    mb = max(m for m in range(1, min(cfg.micro_batch_size, per) + 1) if per % m == 0)
    return mb, per // mb, seqs


def _source_dtype(model_dir: Path) -> torch.dtype:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def _make_batch(seqs: SequenceSet, ids: np.ndarray, documents: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input ids (n, L), next-token targets (n, L) and position ids (n, L) or None.

    Target t is token t+1, -100 where there is no loss (the last position, masked prompt tokens).
    Padding the targets instead of slicing the logits saves a copy of the largest activation.
    ``documents`` (document-masked packing): each document's segment starts at the EOS that ends
    the previous one (position 0), so a document's first token is still a target, predicted from
    that separator alone (evaluations score it too, after a BOS or EOS prefix), and no token sees
    another document; given these position ids, transformers' attention keeps attention within
    each segment (packed sequences)."""
    toks, tgts, poss = [], [], []
    for gid in ids:
        t, m, starts = seqs.get(int(gid))
        toks.append(t)
        tgt = np.full_like(t, -100)
        tgt[:-1] = t[1:]
        if m is not None:
            tgt[:-1][m[1:] == 0] = -100
        if documents:
            seg = starts - 1  # the previous document's EOS opens the next segment
            seg = seg[seg > 0]
            pos = np.arange(len(t), dtype=np.int64)
            first = np.zeros(len(t), dtype=np.int64)
            first[seg] = seg
            pos -= np.maximum.accumulate(first)
            poss.append(pos)
        tgts.append(tgt)
    pos_t = torch.from_numpy(np.stack(poss)) if documents else None
    return torch.from_numpy(np.stack(toks)), torch.from_numpy(np.stack(tgts)), pos_t


class Trainer:
    def __init__(self, spec: RunSpec, progress: Progress | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.spec = spec
        self.cfg = TrainConfig.model_validate(spec.config)
        self.progress = progress or NullProgress()
        self.on_step = on_step
        self.out_dir = Path(spec.out_dir)
        self.work = self.out_dir / "work"
        self.model_dir = Path(spec.model_dir)

    # ------------------------------------------------------------------------------------ data
    def _setup_data(self, world: int) -> None:
        cfg, seed = self.cfg, self.spec.seed
        shards = [TokenShard.from_json(s) for s in self.spec.train_shards]
        self.documents = self.spec.packing == "documents"
        if self.documents and not all(s.has_docs for s in shards):
            raise DataError("packing: documents needs document boundaries (docs.bin) in the token cache; "
                            "the data was tokenized by an older finrecipe: delete its .cache/tokens and rerun")
        frac = cfg.validation.fraction if cfg.validation else 0.0
        self.val_items: list[tuple[SequenceSet, int]] = []
        if frac > 0 and all(s.has_docs for s in shards):
            # Hold out whole documents: no document has sequences in both sets.
            parts = [split_documents(s.doc_ends(), frac, seed, i)  # type: ignore[arg-type]
                     for i, s in enumerate(shards)]
            self.train_set = SequenceSet(shards, cfg.seq_len, views=[t for t, _ in parts])
            held_set = SequenceSet(shards, cfg.seq_len, views=[v for _, v in parts], allow_empty=True)
            train_ids = [np.arange(c) for c in self.train_set.counts]
            self.val_items += [(held_set, j) for j in range(len(held_set))]
        else:
            self.train_set = SequenceSet(shards, cfg.seq_len)
            train_ids, held = split_heldout(self.train_set.counts, frac, seed)
            for i, ids in enumerate(held):
                self.val_items += [(self.train_set, int(self.train_set.offsets[i]) + int(j)) for j in ids]
        self.micro, self.grad_accum, self.batch_seqs = batch_plan(cfg, world)
        total = cfg.max_tokens // cfg.seq_len if cfg.max_tokens is not None else None
        epochs = cfg.epochs if cfg.epochs is not None else (None if total is not None else 1.0)
        self.order = build_order(train_ids, self.train_set.offsets, [s.weight for s in shards], seed,
                                 epochs=epochs, total_sequences=total)
        self.total_steps = len(self.order) // self.batch_seqs
        if self.total_steps == 0:
            raise DataError(
                f"{len(self.order)} training sequences of {cfg.seq_len} tokens are fewer than one global "
                f"batch ({self.batch_seqs} sequences); add data, raise epochs or lower the batch size")
        # Validation: held-out sequences of the training data, then separate datasets.
        if self.spec.val_shards:
            vset = SequenceSet([TokenShard.from_json(s) for s in self.spec.val_shards], cfg.seq_len)
            self.val_items += [(vset, j) for j in range(len(vset))]
        if cfg.validation and len(self.val_items) > cfg.validation.max_sequences:
            pick = np.random.default_rng([seed, 31]).permutation(len(self.val_items))
            self.val_items = [self.val_items[k] for k in sorted(pick[: cfg.validation.max_sequences])]

    # ----------------------------------------------------------------------------------- model
    def _setup_model(self, d: tdist.Dist) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()  # library code does not print; progress goes through `progress`

        cfg = self.cfg
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and d.device.type == "cuda")
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                             attn_implementation="sdpa",
                                                             trust_remote_code=self.spec.trust_remote_code)
            except ValueError as e:
                if "attention implementation" not in str(e) and "sdpa" not in str(e):
                    raise
                # architectures without SDPA support (Gemma 2): the eager implementation, which
                # honours position_ids the same way (document-masked packing)
                model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                             attn_implementation="eager",
                                                             trust_remote_code=self.spec.trust_remote_code)
        except (OSError, ValueError) as e:
            raise StageError(f"{self.model_dir}: cannot load the model for training: {e}") from None
        model.config.use_cache = False
        self.flops_per_token = model_flops_per_token(model, cfg.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        model.to(d.device)  # type: ignore[arg-type]
        if cfg.activation_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if d.enabled:
            tdist.shard_fsdp2(model, d, self.bf16)
        if cfg.compile:
            layers = tdist.decoder_layers(model)
            for layer in layers:
                layer.compile()
            if not layers:
                model.compile()
        model.train()
        self.model = model
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps, fused=True)  # fused kernels exist for CPU and CUDA

    # ------------------------------------------------------------------------------------ steps
    def _autocast(self, d: tdist.Dist) -> Any:
        if self.bf16 and not d.enabled:  # FSDP2 casts through its MixedPrecisionPolicy
            return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loss_sum(self, d: tdist.Dist, x: torch.Tensor, y: torch.Tensor,
                  pos: torch.Tensor | None = None) -> torch.Tensor:
        kw = {} if pos is None else {"position_ids": pos.to(d.device, non_blocking=True)}
        with self._autocast(d):
            out = self.model(input_ids=x.to(d.device, non_blocking=True), **kw)
        logits = out.logits
        y = y.to(d.device, non_blocking=True)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=-100, reduction="sum")
        aux = getattr(out, "aux_loss", None)
        if aux is not None and getattr(self.model.config, "output_router_logits", False):
            # mixture of experts: the router's load-balancing loss, as transformers adds it to the
            # mean loss (router_aux_loss_coef × aux); here per target, as this is a sum
            coef = float(getattr(self.model.config, "router_aux_loss_coef", 0.0) or 0.0)
            loss = loss + coef * aux.float() * (y != -100).sum()
        return loss

    def _train_step(self, d: tdist.Dist, step: int) -> tuple[float, float, int]:
        mb, world, accum = self.micro, d.world, self.grad_accum
        base = step * self.batch_seqs
        micro = []
        for m in range(accum):
            a = base + (m * world + d.rank) * mb
            micro.append(_make_batch(self.train_set, self.order[a:a + mb], self.documents))
        count = torch.tensor([float(sum(int((y != -100).sum()) for _, y, _ in micro))], device=d.device)
        count = d.all_reduce_sum(count)
        n_targets = float(count.item())
        denom = max(n_targets, 1.0)
        total = torch.zeros((), device=d.device)
        for m, (x, y, pos) in enumerate(micro):
            if d.enabled:
                self.model.set_requires_gradient_sync(m == accum - 1)  # type: ignore[operator]
            loss_sum = self._loss_sum(d, x, y, pos)
            (loss_sum * (world / denom)).backward()
            total += loss_sum.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or math.inf)
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        loss = float(d.all_reduce_sum(total.reshape(1)).item()) / denom
        grad_norm = float(gn)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
            raise StageError(
                f"step {step + 1} of {self.total_steps}: the training {what} (not finite); training "
                f"stopped without applying it and without saving a model; the last good checkpoint "
                f"stays in {self.work / 'ckpt'}. Lower optimizer.lr (or check the data) and run again")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, int(n_targets)

    @torch.no_grad()
    def _validate(self, d: tdist.Dist) -> float | None:
        if not self.val_items:
            return None
        self.model.eval()
        mb, world = self.micro, d.world
        n = len(self.val_items)
        rounds = math.ceil(n / (mb * world))
        tot = torch.zeros(2, device=d.device)
        for k in range(rounds):
            lo = k * mb * world + d.rank * mb
            chunk = self.val_items[lo:lo + mb]
            dummy = not chunk
            if dummy:  # every rank must run the same number of forwards under FSDP
                chunk = self.val_items[:1]
            rows = [_make_batch(sset, np.array([gid]), self.documents) for sset, gid in chunk]
            x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            pos = torch.cat([r[2] for r in rows if r[2] is not None]) if self.documents else None
            ls = self._loss_sum(d, x, y, pos)
            if not dummy:
                tot[0] += ls
                tot[1] += (y != -100).sum()
        d.all_reduce_sum(tot)
        self.model.train()
        return float(tot[0] / tot[1].clamp(min=1))

    # ----------------------------------------------------------------------------------- export
    def _export(self, d: tdist.Dist, dest: Path | None = None) -> Path:
        """The live weights as a Hugging Face model directory in the source dtype (every rank
        calls this; rank 0 writes ``dest``, by default the stage output ``model/``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoTokenizer, GenerationConfig

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        dest = dest if dest is not None else self.out_dir / "model"
        if not d.is_main:
            return dest
        config = self.model.config
        dtype = _source_dtype(self.model_dir)
        if getattr(config, "tie_word_embeddings", False):  # tied weights are stored once, as loaded
            tied = getattr(self.model, "_tied_weights_keys", None) or {}
            for k in [*(tied.keys() if isinstance(tied, dict) else tied), "lm_head.weight"]:
                sd.pop(k, None)
        tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in sd.items()
                   if isinstance(v, torch.Tensor)}
        with atomic_dir(dest, overwrite=True) as tmp:
            # transformers' own writer: the checkpoint layout the input had (it reverts in-memory
            # conversions such as fused mixture-of-experts weights, and leaves tied weights out)
            use_cache = config.use_cache
            config.use_cache = True
            config.dtype = dtype
            self.model.save_pretrained(tmp, state_dict=tensors, max_shard_size=SHARD_BYTES,
                                       is_main_process=True)
            del tensors
            config.dtype = dtype  # the saved weights' dtype (save_pretrained writes the in-memory one)
            config.save_pretrained(tmp)
            try:
                gen = GenerationConfig.from_pretrained(self.model_dir)
            except OSError:
                gen = GenerationConfig.from_model_config(config)
            gen.save_pretrained(tmp)
            try:
                AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=self.spec.trust_remote_code
                                              ).save_pretrained(tmp)
            except (OSError, ValueError) as e:
                log.warning("%s: no tokenizer copied to the output: %s", self.model_dir, e)
            config.use_cache = use_cache  # training continues after a probe's export
        return dest

    def _install(self, d: tdist.Dist, src: Path) -> Path:
        """The stage output ``model/`` as a copy (hard links where possible) of an exported
        model directory (the best probed checkpoint)."""
        dest = self.out_dir / "model"
        if d.is_main:
            import os
            import shutil

            with atomic_dir(dest, overwrite=True) as tmp:
                for f in sorted(src.iterdir()):
                    if f.is_file():
                        try:
                            os.link(f, tmp / f.name)
                        except OSError:
                            shutil.copy2(f, tmp / f.name)
        d.barrier()
        return dest

    # ------------------------------------------------------------------------------------ probe
    def _setup_probe(self, d: tdist.Dist, meta: dict[str, Any] | None, start: int) -> tprobe.Prober | None:
        if self.spec.probe is None:
            return None
        prober = tprobe.Prober(tprobe.ProbeSpec.model_validate(self.spec.probe), self.work, d.is_main,
                               str(d.device))
        prober.restore(meta.get("probe") if meta else None, start)
        if start >= self.total_steps:
            return prober
        if start and prober.history:
            log.info("merge probe: resuming with %d probes (best: step %s)", len(prober.history),
                     prober.best_step)
        prober.load()
        d.barrier()
        return prober

    def _probe(self, d: tdist.Dist, prober: tprobe.Prober, done: int) -> dict[str, Any]:
        pr = prober.probe(self.model, d, done)  # reads the weights only
        if prober.spec.keep == "best" and pr["improved"]:
            self._export(d, prober.best_dir(done))
            d.barrier()
        log.info("merge probe at step %d: %.4f bits/byte%s%s", done, pr["bits_per_byte"],
                 "" if pr["agreement"] is None else f", agreement {pr['agreement']:.4f}",
                 " (best so far)" if pr["improved"] else f" (best: step {pr['best_step']})")
        return pr

    def _probe_summary(self, prober: tprobe.Prober, output_step: int, stopped_early: bool) -> dict[str, Any]:
        from finrecipe.search.objective import select

        sp = prober.spec
        best = prober.best_step
        rec = next((r for r in prober.history if r["step"] == best), None)
        met = select([(str(r["step"]), tprobe.record_scores(r)) for r in prober.history], prober.rule)[1] \
            if prober.history else None
        return {
            "schema": "finrecipe.merge_probe/1",
            "instruct": sp.instruct, "weight": sp.weight, "every_steps": sp.every_steps,
            "keep": sp.keep, "stop_when_no_improvement": sp.stop_when_no_improvement,
            "rule": prober.rule.model_dump(mode="json"), "constraint_met": met,
            "probes": len(prober.history), "best_step": best,
            "best": None if rec is None else {k: rec[k] for k in ("bits_per_byte", "agreement",
                                                                  "token_agreement", "utility")},
            "output_step": output_step, "stopped_early": stopped_early,
            "selection_data": {"domain": {"dataset": sp.domain_dataset, "what": sp.domain_desc,
                                          "documents": len(sp.domain_texts)},
                               "instruction": None if sp.instruction is None else
                               {"prompts": sp.prompts_name, "count": len(sp.prompts)}},
            "protected": list(sp.protected),
            "load_seconds": round(prober.load_seconds, 3),
            "probe_seconds": round(sum(float(r.get("seconds", 0.0)) for r in prober.history), 3),
        }

    # --------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        launch = cfg.launch
        d = tdist.init(cfg.device, launch.backend if launch else "auto")
        try:
            return self._run(d)
        finally:
            tdist.shutdown(d)

    def _run(self, d: tdist.Dist) -> dict[str, Any]:
        cfg, seed = self.cfg, self.spec.seed
        torch.manual_seed(seed + d.rank)
        np.random.seed((seed + d.rank) % 2**32)
        self._setup_data(d.world)
        self._setup_model(d)
        self.work.mkdir(parents=True, exist_ok=True)
        if d.is_main:  # what a launcher following metrics.jsonl needs for its progress line
            write_json_atomic(self.work / "plan.json", {"total_steps": self.total_steps,
                                                        "global_batch_tokens": self.batch_seqs * cfg.seq_len,
                                                        "world": d.world})
        metrics = MetricsLog(self.out_dir / "metrics.jsonl",
                             self.out_dir / "tensorboard" if d.is_main else None) if d.is_main else None
        ckpt = Checkpointer(self.work, d, cfg.keep_checkpoints)
        ckpt.clean_partial()
        start, tokens_seen, elapsed0 = 0, 0, 0.0
        meta = ckpt.load_latest(self.model, self.optimizer)
        if meta is not None:
            if int(meta["batch_seqs"]) != self.batch_seqs or int(meta["total_steps"]) != self.total_steps:
                raise StageError(f"{ckpt.root}: checkpoint of step {meta['step']} was made with a different "
                                 f"batch or data plan; delete {self.work} to start over")
            start, tokens_seen, elapsed0 = int(meta["step"]), int(meta["tokens"]), float(meta["elapsed"])
            log.info("resuming from step %d of %d", start, self.total_steps)
        prober = self._setup_probe(d, meta, start)
        if metrics is not None:
            metrics.truncate_after(start)
        device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else None
        peak = peak_flops(device_name)
        every_val = cfg.validation.every_steps if cfg.validation else None
        last: dict[str, Any] = {}
        t_run = time.perf_counter()
        tokens_run = 0
        val_loss = None
        stopped_early = False
        with _StopFlag() as stop, self.progress.task(self.spec.title, total=self.total_steps,
                                                      unit="step") as task:
            task.update(completed=start)
            for step in range(start, self.total_steps):
                lr = cfg.optimizer.lr * lr_factor(cfg.schedule, step, self.total_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                t0 = time.perf_counter()
                loss, gn, n_targets = self._train_step(d, step)
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                dt = time.perf_counter() - t0
                step_tokens = self.batch_seqs * cfg.seq_len
                tokens_seen += step_tokens
                tokens_run += step_tokens
                tps = step_tokens / dt if dt > 0 else float("nan")
                m = mfu(self.flops_per_token, tps, d.world, peak)
                done = step + 1
                rec: dict[str, Any] = {"step": done, "loss": loss, "lr": lr, "grad_norm": gn,
                                       "tokens": tokens_seen, "target_tokens": n_targets,
                                       "tokens_per_s": tps, "mfu": m if m is not None else "n/a"}
                if every_val and (done % every_val == 0 or done == self.total_steps):
                    val_loss = self._validate(d)
                    if val_loss is not None:
                        rec["val_loss"] = val_loss
                info = f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
                if prober is not None and prober.due(done, self.total_steps):
                    pr = self._probe(d, prober, done)
                    rec.update(tprobe.metrics_fields(pr))
                    info += " · " + tprobe.info(pr)
                    stopped_early = done < self.total_steps and prober.should_stop()
                last = rec
                if metrics is not None and (done % cfg.log_every == 0 or done == self.total_steps
                                            or "val_loss" in rec or "probe_bits_per_byte" in rec
                                            or stopped_early):
                    metrics.write(rec)
                task.update(completed=done, info=info)
                if self.on_step is not None:
                    self.on_step(rec)
                stopping = d.any_true(stop.set)
                periodic = cfg.checkpoint_every_steps and done % cfg.checkpoint_every_steps == 0
                if done < self.total_steps and (periodic or stopping) and not stopped_early:
                    ckpt.save(self.model, self.optimizer, {
                        "step": done, "data_position": done * self.batch_seqs, "tokens": tokens_seen,
                        "elapsed": elapsed0 + time.perf_counter() - t_run, "batch_seqs": self.batch_seqs,
                        "total_steps": self.total_steps, "world": d.world,
                        **({"probe": prober.state()} if prober is not None else {})})
                    if prober is not None:
                        prober.prune(_recorded_bests(ckpt))
                if stopped_early:
                    assert prober is not None
                    log.info("merge probe: %d probes without improvement on step %s; stopping after step "
                             "%d of %d", prober.since_best(), prober.best_step, done, self.total_steps)
                    break
                if stopping and done < self.total_steps:
                    raise StageError(f"training stopped by SIGTERM after step {done} of "
                                     f"{self.total_steps}; a checkpoint was saved in {self.work / 'ckpt'}; "
                                     "run again to resume")
        if val_loss is None and self.val_items and "val_loss" not in last:
            val_loss = self._validate(d)
        run_time = time.perf_counter() - t_run
        elapsed = elapsed0 + run_time
        steps_run = int(last.get("step", start)) if last else start
        output_step = steps_run
        if prober is not None and prober.spec.keep == "best" and prober.best_step is not None:
            output_step = prober.best_step
            self._install(d, prober.best_dir(output_step))
        else:
            self._export(d)
        result = {
            "final_train_loss": last.get("loss"),
            "final_val_loss": val_loss,
            "steps": steps_run,
            "tokens": tokens_seen,
            "tokens_per_s": tokens_run / run_time if tokens_run and run_time > 0 else None,
            "train_seconds": elapsed,
            "params": self.n_params,
            "world_size": d.world,
            "global_batch_tokens": self.batch_seqs * cfg.seq_len,
        }
        if prober is not None:
            result["planned_steps"] = self.total_steps
            result["output_step"] = output_step
            result["probe"] = self._probe_summary(prober, output_step, stopped_early)
        if metrics is not None:
            if val_loss is not None and "val_loss" not in last:
                metrics.write({"step": steps_run, "val_loss": val_loss})
            metrics.close()
            from finrecipe.train.metrics import read_metrics

            plot_loss_curve(read_metrics(self.out_dir / "metrics.jsonl"), self.out_dir / "loss_curve.png",
                            title=self.spec.title)
            write_json_atomic(self.work / "result.json", result, indent=1)
        d.barrier()
        return result


def _recorded_bests(ckpt: Checkpointer) -> set[int]:
    """The best probe steps that the kept training checkpoints' manifests record."""
    out: set[int] = set()
    for _s, path in ckpt.steps():
        try:
            b = json.loads((path / "manifest.json").read_text()).get("probe", {}).get("best_step")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(b, int):
            out.add(b)
    return out


def train(spec: RunSpec, progress: Progress | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one training run described by ``spec``; returns the final metrics."""
    return Trainer(spec, progress, on_step).run()
