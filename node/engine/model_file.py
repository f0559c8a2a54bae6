"""Is this path a GGUF model file? A cheap check (no engine load) with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

GGUF_MAGIC = b"GGUF"
"""the first four bytes of every GGUF file (the format's magic number)."""


def model_file_problem(path: str | Path) -> str | None:
    """What is wrong with ``path`` as a model file, or None when it starts like a GGUF file."""
    file = Path(path).expanduser()
    if not file.exists():
        return f"{path}: no such file"
    if file.is_dir():
        return f"{path}: is a directory, not a GGUF file"
    try:
        with file.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    if magic != GGUF_MAGIC:
        return f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)"
    return None
