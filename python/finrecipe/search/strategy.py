"""Search strategies: which candidate to try next.

- `grid`: every point of the space's grid (`grid_points` values per weight and density axis), in a
  fixed order;
- `random`: uniform draws from `random.Random(seed)`;
- `bayesian`: optuna's TPE sampler (seeded; told each trial's utility, and for the constrained rule
  the constraint `min_agreement − agreement` ≤ 0 through optuna's `constraints_func`).

All three are deterministic for a fixed seed and fixed scores, so a resumed search (finished trials
read from the trial cache) asks for exactly the same candidates again.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from finrecipe.search.space import ROUND, Candidate, SearchSpace, grid, method_has_density, random_candidate

Strategy = Literal["grid", "random", "bayesian"]
# tell(candidate) -> (utility, constraint value; <= 0 means feasible)
Evaluate = Callable[[Candidate], tuple[float, float]]


def run_strategy(strategy: Strategy, space: SearchSpace, instruct: str, domains: Sequence[str], trials: int,
                 seed: int, evaluate: Evaluate, *, constrained: bool = False) -> None:
    """Ask `trials` candidates of `strategy` and evaluate each (in order)."""
    if strategy == "grid":
        for i, c in enumerate(grid(space, instruct, domains)):
            if i >= trials:
                break
            evaluate(c)
    elif strategy == "random":
        rng = random.Random(seed)
        for _ in range(trials):
            evaluate(random_candidate(space, instruct, domains, rng))
    elif strategy == "bayesian":
        _bayesian(space, instruct, domains, trials, seed, evaluate, constrained)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")


def _bayesian(space: SearchSpace, instruct: str, domains: Sequence[str], trials: int, seed: int,
              evaluate: Evaluate, constrained: bool) -> None:
    try:
        import optuna
    except ImportError:
        from finrecipe.errors import ConfigError

        raise ConfigError("strategy: bayesian needs optuna (pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def constraints(ft: Any) -> Sequence[float]:
        return list(ft.user_attrs.get("constraint", [0.0]))

    # optuna >= 5: Trial.set_constraint (constraints_func is deprecated); optuna 4: constraints_func
    native = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)),
                                         constraints_func=constraints if constrained and not native else None)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(trials):
        t = study.ask()
        method = t.suggest_categorical("method", list(space.methods))
        dom = t.suggest_categorical("domain", list(domains))
        w: dict[str, float | tuple[float, ...]] = {}
        for m in (instruct, dom):
            lo, hi = space.weight_range(m)
            vals = [round(t.suggest_float(f"w:{m}:{g}", lo, hi), ROUND) if hi > lo else lo
                    for g in range(space.layer_groups)]
            w[m] = float(vals[0]) if len(vals) == 1 else tuple(float(x) for x in vals)
        d = None
        if method_has_density(str(method)):
            lo, hi = space.density
            d = round(t.suggest_float("density", lo, hi), ROUND) if hi > lo else lo
        value, constraint = evaluate(Candidate(str(method), str(dom), w, d))
        if constrained and native:
            t.set_constraint("agreement", constraint)
        else:
            t.set_user_attr("constraint", [constraint])
        study.tell(t, value)


def candidates_of(strategy: Strategy, space: SearchSpace, instruct: str, domains: Sequence[str], trials: int,
                  seed: int) -> Iterator[Candidate]:
    """The candidates of a strategy that does not depend on scores (grid, random), for planning."""
    out: list[Candidate] = []
    if strategy == "bayesian":
        raise ValueError("bayesian candidates depend on the scores")

    def collect(c: Candidate) -> tuple[float, float]:
        out.append(c)
        return 0.0, 0.0

    run_strategy(strategy, space, instruct, domains, trials, seed, collect)
    return iter(out)


__all__ = ["Strategy", "candidates_of", "run_strategy"]
