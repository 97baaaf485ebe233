"""A toy GRPO task for the stock-verl CPU smoke run (recipes/run_cpu_stock_grpo.sh): parquet + reward.

The rows are in verl's RLHF parquet format (data_source, prompt, ability, reward_model, extra_info). The
reward is a continuous score, so a random tiny model's samples differ and GRPO advantages are non-zero.

    python -m selfemo_verl.cpu.toy_task OUT_DIR   # writes OUT_DIR/{train,val}.parquet
"""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

from selfemo_verl.files import atomic_write
from selfemo_verl.labels import LABEL_SPACES, data_source

DATA_SOURCE = data_source("toy")  # a selfemo source, but no ERC dataset: the corpus metrics leave it out


def toy_rows(n: int, split: str, seed: int = 0) -> list[dict]:
    """`n` single-turn prompts asking for a word; ground truth is the word."""
    rng = random.Random(f"{seed}-{split}")
    words = LABEL_SPACES["meld"]
    rows = []
    for index in range(n):
        word = rng.choice(words)
        prompt = [{"role": "user", "content": f"Say the emotion word {word} inside <emotion></emotion> tags."}]
        rows.append(dict(data_source=DATA_SOURCE, prompt=prompt, ability="toy",
                         reward_model={"style": "rule", "ground_truth": word},
                         extra_info={"split": split, "index": index}))
    return rows


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """Share of the ground-truth word's letters that occur in the response (never raises).

    >>> compute_score("selfemo/toy", "oy", "joy"), compute_score("selfemo/toy", "", "joy")
    (0.6666666666666666, 0.0)
    """
    text = solution_str if isinstance(solution_str, str) else ""
    letters = str(ground_truth)
    return sum(ch in text for ch in letters) / max(1, len(letters))


def write_toy_parquet(out_dir: str | os.PathLike, n_train: int = 64, n_val: int = 8) -> Path:
    """Write train.parquet and val.parquet (pandas' parquet, each file atomically: `files.atomic_write`); returns
    out_dir."""
    import pandas as pd

    out = Path(out_dir)
    for split, n in (("train", n_train), ("val", n_val)):
        buffer = io.BytesIO()
        pd.DataFrame(toy_rows(n, split)).to_parquet(buffer)
        atomic_write(out / f"{split}.parquet", buffer.getvalue())
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m selfemo_verl.cpu.toy_task OUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(write_toy_parquet(sys.argv[1]))
