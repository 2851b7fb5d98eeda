"""Merge probes: score the merge of the live weights of a continual-pretraining run.

Every K steps a trainer can ask "if I stopped now and merged, how good would the merge be?":

    probe = MergeProbe.load(base_dir, instruct_dir, weight=1.0, domain_texts=dev_texts,
                            prompts=prompts, instruction=InstructionObjective(...))
    scores = probe.score(model.named_parameters())     # θ_t: the live (full) tensors
    metrics.log(step, probe_bits_per_byte=scores.bits_per_byte, probe_agreement=scores.agreement)

The probe merges ``base + W·(instruct − base) + (θ_t − base) = θ_t + W·τ_I`` into a separate
scoring copy of the model (the training weights are only read), then scores it with the merge
search's objective (`finrecipe.search.objective`: domain bits per byte, instruction agreement
relative to the instruct model). The instruction vector τ_I is computed once and kept (float32, on
the scoring model's device); the instruct responses are generated once at `load`.

`score` takes any iterable of ``(name, tensor)`` pairs holding full tensors, so a sharded
(FSDP2) trainer can gather one block at a time and pass a generator: memory is bounded by one
gathered block plus the scoring copy and τ_I (kept when it fits in TAU_BUDGET_BYTES, else read
per tensor from the memory-mapped base and instruct files at every probe). Names are the Hugging Face parameter names; a name
the probe does not know is an error (a wrong model), a tensor not passed keeps its last value.
The trainer side (the `continual_pretraining` stage's `merge_probe:` option) is
`finrecipe.train.probe`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from finrecipe.search.objective import (
    DevData,
    InstructionObjective,
    Scores,
    generate_responses,
    response_items,
    rolling_items,
    score_model,
)

# τ_I is kept (float32, on the scoring device) when it takes at most this many bytes; a larger one
# is read per tensor from the memory-mapped base and instruct files at every probe instead.
TAU_BUDGET_BYTES = 8 * 1024**3


class MergeProbe:
    def __init__(self, model: Any, tokenizer: Any, instruct_vector: dict[str, Any], weight: float,
                 data: DevData, readers: tuple[Any, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tau = instruct_vector
        self.weight = float(weight)
        self.data = data
        self.targets = dict(model.state_dict())
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.readers = readers  # (base, instruct): τ_I read per tensor when it is not kept

    def _tau(self, name: str, device: Any) -> Any:
        import torch

        if self.readers is None:
            return self.tau.get(name)
        base, inst = self.readers
        if name not in inst.where:
            return None
        return inst.get(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)

    @classmethod
    def load(cls, base_dir: str | Path, instruct_dir: str | Path, *, weight: float = 1.0,
             domain_texts: Sequence[str], prompts: Sequence[str] = (),
             instruction: InstructionObjective | None = None, device: str | None = None,
             max_length: int | None = None) -> MergeProbe:
        """A scoring copy of the instruct model, τ_I, the tokenized dev text and the instruct
        model's responses (its own score on them is the agreement reference)."""
        import torch

        from finrecipe.eval.model import load_model, pick_device
        from finrecipe.eval.scoring import model_max_length
        from finrecipe.search.fastmerge import _Reader

        dev = pick_device(device)
        model, tok = load_model(instruct_dir, device=dev, dtype="bfloat16" if dev.startswith("cuda") else "float32")
        ins = instruction or InstructionObjective()
        L = min(max_length or 10**9, model_max_length(model, tok))
        data = DevData(domain_items=rolling_items(tok, domain_texts, L),
                       domain_bytes=sum(len(t.encode("utf-8")) for t in domain_texts), domain_docs=len(domain_texts))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if prompts:
            data.responses = generate_responses(model, tok, list(prompts), max_new_tokens=ins.max_new_tokens,
                                                chat=ins.chat)
            data.response_items = response_items(data.responses, L)
            data.instruct_logprob = score_model(model, data, pad_id=int(pad)).response_logprob
        base, inst = _Reader(Path(base_dir)), _Reader(Path(instruct_dir))
        tau: dict[str, Any] = {}
        targets = model.state_dict()
        for name in inst.where:
            if name not in targets:
                from finrecipe.errors import MismatchError

                # e.g. experts that transformers fuses in memory: τ_I would silently go missing
                raise MismatchError(f"merge probe: the instruct model's tensor {name!r} has no parameter of "
                                    "that name once loaded (an in-memory layout that differs from the "
                                    "checkpoint's); probing this architecture is not supported")
        if 4 * sum(targets[n].numel() for n in inst.where) > TAU_BUDGET_BYTES:
            return cls(model, tok, tau, weight, data, readers=(base, inst))
        with torch.no_grad():
            for name in inst.where:
                tau[name] = inst.get(name).to(dev, torch.float32) - base.get(name).to(dev, torch.float32)
        return cls(model, tok, tau, weight, data)

    def score(self, live: Iterable[tuple[str, Any]]) -> Scores:
        """Scores of ``θ_t + W·τ_I`` for the live tensors θ_t."""
        import torch

        from finrecipe.errors import MismatchError

        with torch.no_grad():
            for name, t in live:
                target = self.targets.get(name)
                if target is None:
                    raise MismatchError(f"merge probe: the live model's tensor {name!r} is not in the instruct model")
                x = t.detach().to(target.device, torch.float32)
                tau = self._tau(name, target.device)
                if tau is not None:
                    x = x + self.weight * tau
                target.copy_(x.reshape(target.shape))
        return score_model(self.model, self.data, pad_id=int(self.pad))


__all__ = ["MergeProbe"]
