"""Writing the project's output files: one atomic write for every result, report and dataset file.

Core module (no verl, no ray).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` via a temp file in the same directory + fsync + os.replace.

    A crash (or an exception) before the rename leaves the previous file untouched and removes the temp file.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write(target, "joy"); target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('joy', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:  # mode 0o666 & ~umask, like a plain open
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
