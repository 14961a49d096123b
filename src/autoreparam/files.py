"""Writing files so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic"]


def write_atomic(path: str | Path, content: str | Callable[[Path], None]) -> Path:
    """Write ``content`` (text, or a function that writes a given path) to ``path`` atomically.

    The data goes to a temporary file in the same folder, which replaces ``path`` only once it is
    complete; on any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
