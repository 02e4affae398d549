"""Atomic file writes: a file on disk is either the old version or the complete new one.

Every file the package writes (checkpoints, exported models, cached downloads, token bins,
tokenizer caches) goes through this module. The recipe:

1. write to a temporary file beside the destination (same directory, so same file system),
   named ``.{name}.{pid}.{random}.tmp``;
2. flush and ``fsync`` it, set mode 0644 (``mkstemp`` makes 0600 files; nothing we write
   is secret);
3. ``os.replace`` it onto the destination (atomic on POSIX and Windows), then ``fsync`` the
   directory so the rename itself survives a power cut.

If anything fails, or the process is interrupted, the temporary file is removed and the
destination is untouched. A process killed with ``kill -9`` cannot clean up, so each write
first removes the temporary files of writers that are no longer running (``sweep_orphans``).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_ORPHAN = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


def _alive(pid: int) -> bool:
    """Whether a process with this id is running on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or we cannot tell: keep its file
    return True


def sweep_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files left in ``folder`` by writers that died; return what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _ORPHAN.match(name)
        if match and not _alive(int(match.group(1))):
            file = Path(folder) / name
            try:
                file.unlink()
                removed.append(file)
            except OSError:
                pass
    return removed


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_writer(dest: str | os.PathLike) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield ``(file, tmp_path)``: a binary file to write, placed at ``dest`` on success.

    Check what you wrote inside the block (e.g. hash ``tmp_path``): raising there leaves
    ``dest`` untouched and removes the temporary file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(dest.parent)
    prefix = f".{dest.name}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def atomic_write(dest: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` (for writers that take a path), then place the file at ``dest``."""
    with atomic_writer(dest) as (_, tmp):  # fsync of our handle also syncs their writes
        write(tmp)


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``dest`` atomically."""
    with atomic_writer(dest) as (f, _):
        f.write(text.encode("utf-8"))
