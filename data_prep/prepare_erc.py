"""Raw ERC dataset -> verl parquet: OUT/{train,val,test}.parquet, one row per target utterance (docs/method.md §13).

    python data_prep/prepare_erc.py --dataset meld --raw-dir ../shared/data/meld --out-dir data/meld --stats
    python data_prep/prepare_erc.py --dataset emorynlp --raw-dir raw/emorynlp --out-dir data/emorynlp --download

The same command as `python -m selfemo_verl.data.prepare` (the flags and the code are there: this file only calls
its `main`). It stays because the recipes, the docs and the tests name this path.
"""

import sys

from selfemo_verl.data.prepare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
