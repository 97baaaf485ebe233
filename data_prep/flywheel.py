"""Data flywheel CLI: round r's episode dumps + the parquet D_r it trained on -> D_{r+1} (DESIGN.md §6).

    python data_prep/flywheel.py --dumps runs/r0/dumps --base data/meld/train.parquet \\
        --out runs/r1/train.parquet --round 1 [--tau-con 1.0 --min-agreement 0.5 --hard-range 0.2 0.8 \\
        --max-synthetic-share 0.5 --seed 0]

Thin CLI over selfemo_verl.flywheel (the rules are in its module docstring). Writes OUT and
OUT.summary.json (kept/dropped counts by reason, also printed) atomically; the same inputs give the same
bytes. A bad base parquet, dump directory or option prints one line naming the file (and row) on stderr
and exits 2; corrupt dump lines are skipped with a warning and counted in the summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from selfemo_verl.flywheel import FlywheelConfig, FlywheelError, run

_DEFAULTS = FlywheelConfig(round=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dumps", required=True, help="episode dump directory of round r (step_*.jsonl)")
    parser.add_argument("--base", required=True, help="the parquet round r trained on (D_r)")
    parser.add_argument("--out", required=True, help="output parquet D_{r+1}")
    parser.add_argument("--round", type=int, required=True, help="index r+1 of the dataset being built (>= 1)")
    parser.add_argument("--tau-con", type=float, default=_DEFAULTS.tau_con, help="min sIoU(judged, stated)")
    parser.add_argument("--min-agreement", type=float, default=_DEFAULTS.min_agreement, help="min judge_agreement")
    parser.add_argument("--hard-range", type=float, nargs=2, default=list(_DEFAULTS.hard_range),
                        metavar=("LO", "HI"), help="group mean r_rec range of hard rows (inclusive)")
    parser.add_argument("--max-synthetic-share", type=float, default=_DEFAULTS.max_synthetic_share)
    parser.add_argument("--hard-copies", type=int, default=_DEFAULTS.hard_copies, help="copies of a hard row")
    parser.add_argument("--easy-keep-prob", type=float, default=_DEFAULTS.easy_keep_prob,
                        help="keep probability of an easy or hopeless row")
    parser.add_argument("--eps", type=float, default=_DEFAULTS.eps, help="sIoU smoothing of the consistency test")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = FlywheelConfig(
            round=args.round, tau_con=args.tau_con, min_agreement=args.min_agreement,
            hard_range=tuple(args.hard_range), max_synthetic_share=args.max_synthetic_share,
            hard_copies=args.hard_copies, easy_keep_prob=args.easy_keep_prob, seed=args.seed, eps=args.eps,
        )
        summary = run(args.dumps, args.base, args.out, cfg)
    except FlywheelError as err:
        print(f"flywheel: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    if summary["output"]["rows"] == 0:
        print(f"flywheel: warning: {args.out} has no rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
