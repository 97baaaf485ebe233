"""Writing the project's output files: one atomic write for every result, report and dataset file.

Core module (no verl, no ray).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def _write_temp(path: Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to a new temp file beside `path`, fsynced; return it. Nothing left on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:  # mode 0o666 & ~umask, like a plain open
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` via a temp file in the same directory + fsync + os.replace.

    A crash (or an exception) before the rename leaves the previous file untouched and removes the temp file.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write(target, "joy"); target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('joy', ['a.txt'])
    """
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_all(files: dict) -> None:
    """Write several files ({path: text or bytes}) all or nothing: every temp file is written and fsynced before
    the first os.replace, so a failure while writing leaves every previous file untouched and no temp file.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_all({d / "a.txt": "joy", d / "b.txt": b"fear"}); sorted(p.name for p in d.iterdir())
    ['a.txt', 'b.txt']
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
