"""Merge search: choose merge weights, method and domain checkpoint by signals that need no
instruction data (held-out domain bits per byte, agreement with the instruct model's own responses,
optional development exams), with fast in-memory trials and a content-addressed trial cache.

- `space`: the search space and candidates; `strategy`: grid, random, bayesian (optuna TPE);
- `objective`: the signals, their scoring on a loaded model, and the selection rule;
- `fastmerge`: merging a candidate into the weights of a model already in memory;
- `runner`: the search loop, trial cache, tables and the Pareto plot;
- `probe`: scoring a merge of live training weights (a merge probe during continual pretraining).

The `merge_search` stage kind (`finrecipe.stages.merge_search`) is the recipe's entry point.
"""
