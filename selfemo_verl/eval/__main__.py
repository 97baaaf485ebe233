"""Evaluation CLI (docs/method.md §9): score predictions, generate with a model, expression consistency, report.

    python -m selfemo_verl.eval score --predictions P.jsonl --data test.parquet --out DIR
    python -m selfemo_verl.eval generate --model PATH --data test.parquet --out DIR [--limit N]
    python -m selfemo_verl.eval consistency --model PATH --data test.parquet --out DIR [--tau 1.0]
        (--selection FILE for --model: the checkpoint chosen on val by selfemo_verl.model_select; each role's
        token budget: selfemo.agent.max_tokens of the training config, see selfemo_verl.eval.generate)
    python -m selfemo_verl.eval report RUN_DIR... [--out report.md]

Core module: no verl, no ray (torch/transformers/vLLM load only when `generate` / `consistency` run a model).
The scoring rules are in `selfemo_verl.eval.metrics`. A bad input file prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selfemo_verl.eval.generate import add_model_arguments, run_consistency, run_generate
from selfemo_verl.eval.inputs import InputError
from selfemo_verl.eval.report import report, results_row, score
from selfemo_verl.files import atomic_write


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a predictions JSONL against a test parquet")
    for flag in ("--predictions", "--data", "--out"):
        s.add_argument(flag, required=True)
    s.add_argument("--name", default=None, help="method name in results_row.md (default: the out dir name)")
    s.add_argument("--backbone", default="–")
    for command in ("generate", "consistency"):  # the flags live beside the code that reads them
        add_model_arguments(sub.add_parser(command, help=f"{command} with a model (vLLM or HF)"), command)
    r = sub.add_parser("report", help="mean ± sd and a comparison table over run dirs holding metrics.json")
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", default="eval_report.md", help="markdown path (a .json summary is written beside)")
    return parser


def _score(args) -> None:
    metrics = score(args.predictions, args.data, args.out, args.name, args.backbone)
    print(results_row(metrics), end="")


def _report(args) -> None:
    markdown, summary = report(args.runs)
    atomic_write(args.out, markdown)
    atomic_write(Path(args.out).with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    print(markdown, end="")


COMMANDS = {"score": _score, "generate": run_generate, "consistency": run_consistency, "report": _report}


def main(argv=None) -> int:
    """CLI entry point; a bad input file prints one line to stderr and returns 2.

    >>> sorted(COMMANDS)   # one function per subcommand of `_parser`
    ['consistency', 'generate', 'report', 'score']
    """
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
