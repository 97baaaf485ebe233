"""Data flywheel CLI: round r's episode dumps + the parquet D_r it trained on -> D_{r+1} (docs/method.md §7).

    python data_prep/flywheel.py --dumps runs/r0/dumps --base data/meld/train.parquet \\
        --out runs/r1/train.parquet --round 1 [--tau-con 1.0 --min-agreement 0.5 --hard-range 0.2 0.8 \\
        --max-synthetic-share 0.5 --seed 0]

Thin CLI over selfemo_verl.flywheel (the rules are in its module docstring): reads D_r (`read_base`) and the
dumps, builds D_{r+1} (`build_next_round`), writes OUT and OUT.summary.json (kept/dropped counts by reason,
also printed) atomically; the same inputs give the same bytes. A bad base parquet, dump directory or option
prints one line naming the file (and row) on stderr and exits 2; corrupt dump lines are skipped with a warning
and counted in the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfemo_verl.episodes import read_dumps
from selfemo_verl.files import atomic_write
from selfemo_verl.flywheel import FlywheelConfig, FlywheelError, build_next_round, read_base

_DEFAULTS = FlywheelConfig(round=1)


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    """Deterministic parquet bytes: fixed schema without metadata, zstd level 3, one row group."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd", compression_level=3,
                   row_group_size=1 << 30)
    return sink.getvalue().to_pybytes()


def run(dumps, base, out, cfg: FlywheelConfig) -> dict:
    """Read D_r and round r's dumps, build D_{r+1}, write OUT and OUT.summary.json atomically; return the summary."""
    cfg.check()
    base_rows, schema = read_base(base)
    try:
        records, n_corrupt = read_dumps(dumps)
    except ValueError as err:
        raise FlywheelError(str(err)) from None
    rows, summary = build_next_round(base_rows, records, cfg)
    summary["inputs"] = {"base": str(base), "dumps": str(dumps), "corrupt_lines": n_corrupt, **summary["inputs"]}
    atomic_write(out, parquet_bytes(rows, schema))
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(f"{out}.summary.json"), text)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dumps", required=True, help="episode dump directory of round r (step_*.jsonl)")
    parser.add_argument("--base", required=True, help="the parquet round r trained on (D_r)")
    parser.add_argument("--out", required=True, help="output parquet D_{r+1}")
    parser.add_argument("--round", type=int, required=True, help="index r+1 of the dataset being built (>= 1)")
    parser.add_argument("--tau-con", type=float, default=_DEFAULTS.tau_con, help="min sIoU(judged, stated)")
    parser.add_argument("--min-agreement", type=float, default=_DEFAULTS.min_agreement, help="min judge_agreement")
    parser.add_argument("--hard-range", type=float, nargs=2, default=list(_DEFAULTS.hard_range),
                        metavar=("LO", "HI"), help="mean beta=0 recognition score range of hard rows (inclusive)")
    parser.add_argument("--max-synthetic-share", type=float, default=_DEFAULTS.max_synthetic_share)
    parser.add_argument("--hard-copies", type=int, default=_DEFAULTS.hard_copies, help="copies of a hard row")
    parser.add_argument("--easy-keep-prob", type=float, default=_DEFAULTS.easy_keep_prob,
                        help="keep probability of an easy or hopeless row")
    parser.add_argument("--eps", type=float, default=_DEFAULTS.eps,
                        help="sIoU smoothing of the consistency test and the difficulty score")
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
