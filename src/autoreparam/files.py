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
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the file the mode the target has, or the umask's default.
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w", newline="") as fh:  # keep the text's own line endings (CRLF stays CRLF)
                fh.write(content)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
