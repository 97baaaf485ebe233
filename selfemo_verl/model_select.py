"""Model selection on val (the evaluation protocol): the checkpoint with the best val weighted-F1 over all rounds.

Core module (no verl, no ray). The recipes (recipes/_rounds.sh) call it twice:

    python -m selfemo_verl.model_select check OVERRIDE...      # before round 0: the round's Hydra overrides
    python -m selfemo_verl.model_select select ROUND_DIR... --dataset meld --hf-subdir actor/huggingface --out FILE

`select` reads, for each round directory (in the order given = round 0, 1, ...), the lines verl's "file"
logger wrote (`metrics.jsonl`, and `metrics_attempt_<k>.jsonl` kept from interrupted attempts, oldest first; a
later line for the same step wins) and the checkpoints `ckpt/global_step_<step>/<hf-subdir>/config.json`. It
writes the choice as JSON to FILE and prints it. A bad file or no candidate: one line on stderr, exit 2.

Rules:
1. A candidate is a (round, step) with both a finite `val-core/selfemo/weighted_f1/<dataset>` logged at that
   step and a complete saved HF model (config.json and its weight files, `round_inputs.check_export`; an export
   without weights is listed under `incomplete_exports`). A validation without a checkpoint (e.g. step 0 from `trainer.val_before_train`:
   the starting model) or a checkpoint without a validation cannot be chosen; both are listed as skipped.
2. The best val weighted-F1 wins; ties go to the earlier (round, step).
3. verl 0.9.1's v1 trainer saves (`trainer.save_freq`) and then validates (`trainer.test_freq`) the same
   weights at a step, and does both at a run's last step; `check` makes save_freq = test_freq > 0 so that
   every validated step has a checkpoint, and refuses `trainer.max_actor_ckpt_to_keep` other than null
   (verl would delete checkpoints that selection may still choose) and a `trainer.logger` without "file".
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from selfemo_verl.demo_report import read_metrics
from selfemo_verl.files import atomic_write
from selfemo_verl.preflight import PreflightError
from selfemo_verl.round_inputs import check_export

METRIC = "val-core/selfemo/weighted_f1/{dataset}"
_ATTEMPT = re.compile(r"metrics_attempt_(\d+)\.jsonl")


class SelectionError(ValueError):
    """A bad metrics file or config, or nothing to choose: the CLI prints this one line and exits 2."""


@dataclass(frozen=True)
class Candidate:
    """One validated step of one round; `path` is its saved HF model dir, or None when none was saved."""

    round: int
    step: int
    val_weighted_f1: float
    path: str | None


def best(candidates: list[Candidate]) -> Candidate:
    """The candidate with a saved model and the highest val weighted-F1; ties -> the earlier (round, step).

    >>> c = [Candidate(0, 10, 0.5, "a"), Candidate(1, 10, 0.6, "b"), Candidate(1, 20, 0.6, "c")]
    >>> best(c + [Candidate(2, 5, 0.9, None)]).path  # 0.9 has no checkpoint; 0.6 tie -> the earlier step
    'b'
    """
    saved = [c for c in candidates if c.path is not None]
    if not saved:
        raise SelectionError("no validated step has a saved checkpoint")
    return max(saved, key=lambda c: (c.val_weighted_f1, -c.round, -c.step))


def metrics_files(round_dir: Path) -> list[Path]:
    """The round's file-logger outputs, oldest first: interrupted attempts by number, then metrics.jsonl."""
    attempts = sorted((int(m.group(1)), p) for p in round_dir.glob("metrics_attempt_*.jsonl")
                      if (m := _ATTEMPT.fullmatch(p.name)))
    files = [p for _, p in attempts] + [p for p in [round_dir / "metrics.jsonl"] if p.is_file()]
    if not files:
        raise SelectionError(f"{round_dir / 'metrics.jsonl'}: no such file (trainer.logger needs \"file\")")
    return files


def val_scores(files: list[Path], metric: str) -> dict[int, float]:
    """{step: value of `metric`} over the files in order (a later line for a step wins); non-finite dropped."""
    scores: dict[int, float] = {}
    for path in files:
        try:
            rows = read_metrics(path)
        except ValueError as err:
            raise SelectionError(str(err)) from None
        for step, data in rows:
            if metric in data:
                scores[step] = float(data[metric])
    return {step: value for step, value in scores.items() if math.isfinite(value)}


def saved_models(round_dir: Path, hf_subdir: str) -> tuple[dict[int, str], list[dict]]:
    """({step: HF model dir} of the round's checkpoints whose HF export is complete, [the others with the reason]).

    Complete = `round_inputs.check_export`: config.json and weight files that hold the parameter count (FSDP
    writes config.json even when it saved no weights; such an export cannot be evaluated).
    """
    out, broken = {}, []
    for step_dir in (round_dir / "ckpt").glob("global_step_*"):
        step = step_dir.name.removeprefix("global_step_")
        if not (step.isdigit() and (step_dir / hf_subdir / "config.json").is_file()):
            continue
        try:
            check_export(step_dir / hf_subdir)
        except PreflightError as exc:
            broken.append({"step": int(step), "path": str(step_dir / hf_subdir), "reason": str(exc)})
            continue
        out[int(step)] = str(step_dir / hf_subdir)
    return out, sorted(broken, key=lambda b: b["step"])


def round_candidates(r: int, round_dir: Path, metric: str, hf_subdir: str):
    """(validated steps as candidates, checkpoints never validated, incomplete exports) of round r."""
    scores = val_scores(metrics_files(round_dir), metric)
    models, broken = saved_models(round_dir, hf_subdir)
    candidates = [Candidate(r, step, value, models.get(step)) for step, value in sorted(scores.items())]
    unvalidated = [{"round": r, "step": step, "path": path} for step, path in sorted(models.items())
                   if step not in scores]
    return candidates, unvalidated, [{"round": r, **b} for b in broken]


def select(round_dirs, dataset: str, hf_subdir: str) -> dict:
    """The choice over all rounds as a JSON-ready dict: metric, chosen, every validated step, skipped ones."""
    round_dirs = [Path(d) for d in round_dirs]
    metric, candidates, unvalidated, incomplete = METRIC.format(dataset=dataset), [], [], []
    for r, round_dir in enumerate(round_dirs):
        found, never, broken = round_candidates(r, round_dir, metric, hf_subdir)
        candidates, unvalidated, incomplete = candidates + found, unvalidated + never, incomplete + broken
    try:
        chosen = best(candidates)
    except SelectionError:
        no_ckpt = [(c.round, c.step) for c in candidates]
        raise SelectionError(
            f"no checkpoint to choose in {[str(d) for d in round_dirs]}: validated (round, step) {no_ckpt} have no "
            f"complete {hf_subdir} export; checkpoints without {metric}: "
            f"{[(u['round'], u['step']) for u in unvalidated]}; incomplete exports: "
            f"{[(b['round'], b['step']) for b in incomplete]}"
        ) from None
    return {"metric": metric, "rule": "max val weighted-F1 over all rounds; ties -> earlier (round, step)",
            "chosen": {**asdict(chosen), "round_dir": str(round_dirs[chosen.round])},
            "validated": [asdict(c) for c in candidates], "not_validated": unvalidated,
            "incomplete_exports": incomplete}


def _last_values(overrides) -> dict[str, str]:
    """{key: value} of Hydra-style `key=value` overrides (leading + / ++ dropped); the last one of a key wins."""
    out = {}
    for item in overrides:
        key, sep, value = item.lstrip("+").partition("=")
        if sep:
            out[key] = value
    return out


def check_selection_config(save_freq, test_freq, logger, max_ckpt_to_keep) -> None:
    """SelectionError unless every validation has a kept checkpoint and a file-logger line (rule 3).

    >>> check_selection_config(20, 20, ["console", "file"], None)
    >>> check_selection_config(20, 10, ["file"], None)
    Traceback (most recent call last):
    ...
    selfemo_verl.model_select.SelectionError: trainer.save_freq=20 and trainer.test_freq=10 must be equal and > 0: ...
    """
    if not (isinstance(save_freq, int) and save_freq == test_freq and save_freq > 0):
        raise SelectionError(f"trainer.save_freq={save_freq} and trainer.test_freq={test_freq} must be equal and "
                             "> 0: model selection needs a checkpoint at every validated step")
    if "file" not in list(logger or []):
        raise SelectionError(f"trainer.logger={logger} lacks \"file\": model selection reads verl's file logger")
    if max_ckpt_to_keep is not None:
        raise SelectionError(f"trainer.max_actor_ckpt_to_keep={max_ckpt_to_keep} must be null: verl would delete "
                             "validated checkpoints that model selection may choose")


def check_overrides(overrides) -> None:
    """`check_selection_config` on the values a list of Hydra overrides sets (save/test freq, logger required)."""
    values = _last_values(overrides)
    missing = [k for k in ("trainer.save_freq", "trainer.test_freq", "trainer.logger") if k not in values]
    if missing:
        raise SelectionError(f"overrides do not set {missing}; model selection needs them")
    save, test, logger, keep = (yaml.safe_load(values.get(f"trainer.{k}", "null"))
                                for k in ("save_freq", "test_freq", "logger", "max_actor_ckpt_to_keep"))
    check_selection_config(save, test, logger, keep)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.model_select", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="refuse round overrides under which a validated step could lack a checkpoint")
    c.add_argument("overrides", nargs="*")
    s = sub.add_parser("select", help="choose the checkpoint with the best val weighted-F1 over the rounds")
    s.add_argument("rounds", nargs="+", help="round directories in round order (metrics.jsonl, ckpt/)")
    s.add_argument("--dataset", required=True, help="the <dataset> of val-core/selfemo/weighted_f1/<dataset>")
    s.add_argument("--hf-subdir", required=True, help="HF model dir inside global_step_<n>, e.g. actor/huggingface")
    s.add_argument("--out", required=True, help="JSON file for the choice")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            check_overrides(args.overrides)
            return 0
        choice = select(args.rounds, args.dataset, args.hf_subdir)
    except SelectionError as err:
        print(f"model_select: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(choice, indent=2) + "\n"
    atomic_write(args.out, text)
    print(text, end="")
    chosen = choice["chosen"]
    print(f"model_select: round {chosen['round']} step {chosen['step']} (val weighted-F1 "
          f"{chosen['val_weighted_f1']:.4f}): {chosen['path']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
