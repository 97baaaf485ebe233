"""Data flywheel CLI: round r's episode dumps + the parquet D_r it trained on -> D_{r+1} (docs/method.md §7).

    python data_prep/flywheel.py --dumps runs/r0/dumps --base data/meld/train.parquet \\
        --out runs/r1/train.parquet --round 1 [--tau-con 1.0 --min-agreement 0.5 --hard-range 0.2 0.8 \\
        --max-synthetic-share 0.5 --seed 0]

The same command as `python -m selfemo_verl.data.flywheel` (the flags, the rules and the code are there: this file
only calls its `main`). It stays because the recipes, the docs and the tests name this path.
"""

import sys

from selfemo_verl.data.flywheel import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
