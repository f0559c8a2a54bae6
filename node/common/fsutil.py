"""Atomic, permission-aware writes for state on disk."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

SECRET_MODE = 0o600


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = SECRET_MODE) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half.

    The temporary file is created with ``mode`` before any byte is written, so
    a secret is never readable by others, even for an instant. A process killed mid-write
    leaves it behind; ``remove_stale_temp_files`` (run by the node at start) deletes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


_TEMP_NAME_RE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""what ``atomic_write_bytes`` names its temporary files (``tempfile.mkstemp``'s 8 random characters)."""


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files that interrupted atomic writes (a crash between creating the
    temporary file and renaming it) left in ``directory``; return what was removed.

    Call it only while no atomic write can be in progress there (a node calls it at start,
    holding the state dir's lock).
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if _TEMP_NAME_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with _suppress_os_error():
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def atomic_write_json(path: Path, value: Any, *, mode: int = SECRET_MODE) -> None:
    data = json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write_bytes(path, data, mode=mode)


def read_json(path: Path, default: Any = None, *, tolerate_corrupt: bool = False) -> Any:
    """Read a JSON file, returning ``default`` when it does not exist (or, with
    ``tolerate_corrupt``, when it cannot be parsed)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (ValueError, UnicodeDecodeError):
        if tolerate_corrupt:
            return default
        raise


def ensure_private_dir(path: Path, *, tighten: bool = False) -> Path:
    """Create ``path`` (mode 0700) if needed; with ``tighten``, also make an existing one 0700
    (only for directories that are ours alone, such as the node's state dir)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if tighten and path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        return isinstance(exc, OSError)
