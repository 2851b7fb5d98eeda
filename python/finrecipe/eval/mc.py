"""Multiple choice, the lm-eval way: items → (context, delimiter + choice) requests →
log-likelihoods → acc / acc_norm (+ chabsa's F1) with lm-eval's standard errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finrecipe.eval.requests import Request
from finrecipe.eval.scoring import bootstrap_stderr, chabsa_f1, mc_predictions, mean_stderr
from finrecipe.progress import Progress

if TYPE_CHECKING:
    from finrecipe.eval.lm import LM


@dataclass
class MCItem:
    context: str
    choices: list[str]
    gold: int
    delimiter: str = ""


def score_items(lm: LM, items: Sequence[MCItem], progress: Progress | None = None,
                description: str = "scoring") -> list[list[float]]:
    """Per item, the log-likelihood of each choice (context, delimiter + choice)."""
    reqs: list[Request] = []
    for it in items:
        reqs.extend(Request(it.context, it.delimiter + c) for c in it.choices)
    lls = [ll for ll, _ in lm.loglikelihood(reqs, progress=progress, description=description)]
    out: list[list[float]] = []
    k = 0
    for it in items:
        out.append(lls[k:k + len(it.choices)])
        k += len(it.choices)
    return out


def mc_metrics(items: Sequence[MCItem], lls: Sequence[Sequence[float]], *, f1: bool = False
               ) -> dict[str, Any]:
    """acc, acc_norm (+ chabsa-style f1 / f1_norm) with lm-eval's standard errors, and the
    predictions (argmax per item)."""
    accs: list[float] = []
    accn: list[float] = []
    golds: list[int] = []
    preds: list[int] = []
    preds_n: list[int] = []
    for it, ll in zip(items, lls, strict=False):
        p, pn = mc_predictions(ll, it.choices)
        accs.append(1.0 if p == it.gold else 0.0)
        accn.append(1.0 if pn == it.gold else 0.0)
        golds.append(it.gold)
        preds.append(p)
        preds_n.append(pn)
    n = len(items)
    m: dict[str, Any] = {
        "acc": sum(accs) / n if n else None, "acc_stderr": mean_stderr(accs),
        "acc_norm": sum(accn) / n if n else None, "acc_norm_stderr": mean_stderr(accn),
    }
    if f1:
        m["f1"] = chabsa_f1(golds, preds) if n else None
        m["f1_stderr"] = bootstrap_stderr(golds, preds, chabsa_f1)
        m["f1_norm"] = chabsa_f1(golds, preds_n) if n else None
    m["predictions"] = preds
    return m


__all__ = ["MCItem", "mc_metrics", "score_items"]
