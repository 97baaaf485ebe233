"""Evaluation (docs/method.md §9); core, no verl, no ray. `python -m selfemo_verl.eval` is the CLI (`__main__`).

- `metrics`: corpus-level accuracy, weighted/macro-F1, parse failures, majority baseline (also used by the
  trainer's validation hook);
- `inputs`: the user's files it reads (gold parquet, predictions JSONL, model selection), `InputError`;
- `report`: `score` (metrics.json, confusion matrix, results row) and `report` (mean ± sd over runs);
- `generate`: greedy generation with a model (vLLM or transformers) for `generate` and `consistency`.

Importing the package imports none of them.
"""
