"""Fetch the official MELD and EmoryNLP CSVs, verified by sha256 (docs/method.md §13.2).

Core module: no verl. Both datasets come from declare-lab/MELD at a pinned commit; each file is checked
against the sha256 pinned in `SHA256` below and written atomically (`files.atomic_write`), so a bad download
never leaves a file behind. IEMOCAP is never downloaded: USC licenses it for research and forbids
redistribution.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from selfemo_verl.data.erc_data import RAW_FILES, ErcDataError
from selfemo_verl.files import atomic_write

MELD_COMMIT = "2d2011b409d3ca2d7e94460cd007d434b1d0a102"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/declare-lab/MELD/{MELD_COMMIT}"
REPO_DIRS = {"meld": "data/MELD", "emorynlp": "data/emorynlp"}
SHA256 = {  # of each file at MELD_COMMIT
    "train_sent_emo.csv": "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db",
    "dev_sent_emo.csv": "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c",
    "test_sent_emo.csv": "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888",
    "emorynlp_train_final.csv": "462c66c333783adb801836d12d1424f48489bef4fb8ddfec7fbb2f08ce8211d5",
    "emorynlp_dev_final.csv": "20edc9d5917fe705b17b849f7f288e495d4132a60353a6247c3800445bdf8734",
    "emorynlp_test_final.csv": "dbc4b5638acd12c92a5f48def829e04f1c765cddffb4eedbe34216312e0d2d78",
}
IEMOCAP_REFUSAL = (
    "IEMOCAP cannot be downloaded: USC licenses it for research only and forbids redistribution; "
    "obtain it from https://sail.usc.edu/iemocap/ and point --raw-dir at your copy of iemocap.{train,valid,test}.json"
)
TIMEOUT_S = 60


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_url(base_url: str, dataset: str, name: str) -> str:
    """Where a raw file lies under `base_url` (the declare-lab/MELD tree, or a mirror with its layout).

    >>> raw_url("file:///mirror/", "emorynlp", "emorynlp_dev_final.csv")
    'file:///mirror/data/emorynlp/emorynlp_dev_final.csv'
    """
    return f"{base_url.rstrip('/')}/{REPO_DIRS[dataset]}/{name}"


def _fetch(url: str, target: Path, expected: str) -> None:
    """Download `url`; write it to `target` atomically (`files.atomic_write`) only if its sha256 is `expected`.

    Raises ErcDataError on a failed download, a mismatch or a failed write; nothing is left behind then."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise ErcDataError(f"{url}: download failed ({err})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise ErcDataError(f"{url}: sha256 {got} does not match the expected {expected}; not saved to {target}")
    try:
        atomic_write(target, data)
    except OSError as err:
        raise ErcDataError(f"{target}: cannot write the download ({err})") from None


def download(dataset: str, raw_dir: str | os.PathLike, base_url: str = DEFAULT_BASE_URL) -> list[Path]:
    """Fetch the three raw CSVs of `dataset` into `raw_dir` (files already there with the right sha256 are kept).

    URL of a file: `<base_url>/<repo dir>/<name>`, e.g. `<base>/data/MELD/train_sent_emo.csv`; a `file://`
    base works offline.
    """
    if dataset == "iemocap":
        raise ErcDataError(IEMOCAP_REFUSAL)
    out = Path(raw_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in RAW_FILES[dataset].values():
        target, expected = out / name, SHA256[name]
        if not (target.is_file() and _sha256(target) == expected):
            _fetch(raw_url(base_url, dataset, name), target, expected)
        paths.append(target)
    return paths
