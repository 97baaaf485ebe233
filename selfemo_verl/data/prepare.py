"""Raw ERC dataset -> verl parquet: OUT/{train,val,test}.parquet, one row per target utterance (docs/method.md §13).

    python -m selfemo_verl.data.prepare --dataset meld --raw-dir ../shared/data/meld --out-dir data/meld --stats
    python -m selfemo_verl.data.prepare --dataset emorynlp --raw-dir raw/emorynlp --out-dir data/emorynlp --download

(`python data_prep/prepare_erc.py ...` is the same command.) Core module, no verl, no ray: a thin CLI over
`data.erc_data` (readers, rows, parquet) and `data.erc_download`. A bad raw file prints one line naming the file
(and line) on stderr and exits 2; no parquet is written unless all three splits succeed.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from selfemo_verl.data.erc_data import (
    DEFAULT_WINDOW, RAW_FILES, SPLITS, ErcDataError, build_rows, read_split, split_summary, stats_table,
    write_splits,
)
from selfemo_verl.data.erc_download import DEFAULT_BASE_URL, download


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; `--window` below 1 is a usage error (exit 2).

    >>> args = parse_args(["--dataset", "meld", "--raw-dir", "raw", "--out-dir", "out"])
    >>> args.window, args.download, args.stats
    (12, False, False)
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(RAW_FILES))
    parser.add_argument("--raw-dir", required=True, help="folder with the raw files (see docs/method.md §13)")
    parser.add_argument("--out-dir", required=True, help="where {train,val,test}.parquet are written")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="past turns shown, target included")
    parser.add_argument("--download", action="store_true", help="fetch the official CSVs (meld, emorynlp only)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="base URL of the declare-lab/MELD tree")
    parser.add_argument("--stats", action="store_true", help="print the label distribution of all splits")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    return args


def prepare(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Read, build and write all splits; raises ErcDataError on bad input."""
    if args.download:
        download(args.dataset, args.raw_dir, args.base_url)
    rows_by_split = {}
    for split in SPLITS:
        dialogues = read_split(args.dataset, args.raw_dir, split)
        progress = tqdm(dialogues, desc=f"{args.dataset}/{split}", unit="dlg", disable=None, leave=False)
        rows_by_split[split] = build_rows(progress, args.dataset, split, args.window)
    write_splits(rows_by_split, args.out_dir)
    return rows_by_split


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows_by_split = prepare(args)
    except ErcDataError as err:
        print(f"prepare_erc: error: {err}", file=sys.stderr)
        return 2
    for split, rows in rows_by_split.items():
        print(split_summary(split, rows, args.dataset))
    if args.stats:
        print(stats_table(rows_by_split, args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
