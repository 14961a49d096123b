"""Writing files so that a failure never leaves a half-written file behind, nor destroys one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic", "backup_copy"]

MAX_BACKUPS = 1000


def write_atomic(path: str | Path, content: str | Callable[[Path], None]) -> Path:
    """Write ``content`` (text, or a function that writes a given path) to ``path`` atomically.

    The data goes to a temporary file in the same folder, which replaces ``path`` only once it is
    complete and on disk; on any error (or Ctrl-C) the temporary file is removed and ``path`` is
    untouched. A symbolic link is written through: its target is replaced, the link is kept.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        # mkstemp creates 0600; give the file the mode the target has, or the umask's default.
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w", newline="") as fh:  # keep the text's own line endings (CRLF stays CRLF)
                fh.write(content)
        _sync(tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def backup_copy(path: str | Path) -> Path:
    """Copy ``path`` to a backup name that no file has yet: ``FILE.bak``, else ``FILE.bak.1``, ...

    The name is claimed with an exclusive create, so an existing file is never overwritten; on any
    error (or Ctrl-C) the partial copy is removed. Returns the backup's path.
    """
    path = Path(path)
    data = path.read_bytes()
    for n in range(MAX_BACKUPS):
        backup = path.with_name(f"{path.name}.bak" + (f".{n}" if n else ""))
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(backup)) from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            shutil.copystat(path, backup)  # the original's mode and times
            _sync(backup)
        except OSError as exc:
            backup.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(backup)) from exc
        except BaseException:
            backup.unlink(missing_ok=True)
            raise
        return backup
    raise FileExistsError(17, f"{path.name}.bak and {path.name}.bak.1 to .bak.{MAX_BACKUPS - 1} all exist; "
                              "remove some backups", str(path.with_name(path.name + ".bak")))


def _sync(path: Path) -> None:
    """Flush ``path`` to disk, so that a crash after the rename cannot leave an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
