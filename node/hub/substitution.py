"""Model-name parsing and the substitution policy: serve a request for a model this node
does not have with the best model it has of the same family.

Pure functions over strings and plain values, so the rules are tested with tables.

Parsing reads GGUF file names (``Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf``), Ollama tags
(``llama3.1:8b-instruct-q4_K_M``) and OpenAI-style ids (``gpt-4o-mini``). A name none of
whose words is a known family parses to the ``unknown`` family: the sentinel for "I can't
read this", which the policy refuses rather than guessing.

Choosing (policy ``same-family``), among the models this node serves:
1. the family must match (``llama`` never stands in for ``qwen``); an embedding model only
   for an embedding model and a generative one only for a generative one;
2. then the same variant (instruct, base, coder, …) is preferred;
3. then the same version (``3.1`` for ``3.1``), then the nearest version;
4. then the size nearest to the one requested, a smaller model winning a tie (it is faster);
5. then the higher-precision quantisation (``q8_0`` over ``q4_k_m``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from ..common.errors import ConfigError
from ..config import HubConfig

__all__ = ["UNKNOWN_FAMILY", "ModelName", "SubstitutionMode", "SubstitutionPolicy", "choose_substitute",
           "parse_model_name"]

UNKNOWN_FAMILY = "unknown"

# Known families, as the word starts in names; longest first so "codellama" beats "llama".
_FAMILIES = (
    "tinyllama", "codellama", "codegemma", "codestral", "starcoder", "deepseek", "command-r", "mixtral",
    "mistral", "smollm", "granite", "llama", "gemma", "qwen", "phi", "llava", "falcon", "olmo", "yi",
    "gpt", "nomic", "minilm", "bge", "e5", "claude", "internlm", "stablelm", "orca", "vicuna", "zephyr",
    "nemotron", "exaone", "aya", "dolphin", "hermes", "openchat", "solar", "wizardlm", "snowflake",
)
_FAMILY_RE = re.compile(r"^(" + "|".join(re.escape(f) for f in sorted(_FAMILIES, key=len, reverse=True))
                        + r")(\d+(?:\.\d+)?)?$")
_VERSION_RE = re.compile(r"^v?(\d+(?:\.\d+)?)$")
_SIZE_RE = re.compile(r"^(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])$")
_QUANT_RE = re.compile(r"(?:^|[-_.:])(i?q\d(?:_[0-9a-z]{1,2})*|f16|fp16|bf16|f32|fp32)(?=$|[-_.:])")
_SPLIT_RE = re.compile(r"[-_:\s/]+|(?<!\d)\.|\.(?!\d)")
_SKIPPED = frozenset({"meta", "hf", "ggml", "model", "unsloth", "bartowski", "thebloke", "lmstudio", "all",
                      "text", "distill", "latest"})
_NAMED_SIZES = {"mini": 3.8, "small": 7.0, "medium": 14.0}
"""Phi's size names, in billions."""
_VARIANTS = {
    "instruct": "instruct", "it": "instruct", "chat": "instruct", "turbo": "instruct",
    "base": "base", "pt": "base",
    "vision": "vision", "vl": "vision",
    "r1": "reasoning", "reasoning": "reasoning", "thinking": "reasoning",
    "coder": "coder", "code": "coder",
    "embed": "embedding", "embedding": "embedding",
}
_VARIANT_RANK = {"instruct": 0, "base": 1, "vision": 2, "reasoning": 3, "coder": 4, "embedding": 5}
"""when a name says several (``qwen2.5-coder-7b-instruct``), the more specific one wins."""
_EMBEDDING_FAMILIES = frozenset({"nomic", "minilm", "bge", "e5", "snowflake"})
_QUANT_BITS = {"f32": 32.0, "fp32": 32.0, "f16": 16.0, "fp16": 16.0, "bf16": 16.0}


@dataclass(frozen=True, slots=True)
class ModelName:
    """What a model's name says about it (None: the name does not say)."""

    raw: str
    family: str
    version: str | None = None
    params_b: float | None = None
    """parameters in billions (``270m`` → 0.27; ``8x7b`` → 56)."""
    variant: str | None = None
    quantization: str | None = None

    @property
    def known(self) -> bool:
        return self.family != UNKNOWN_FAMILY

    @property
    def embedding(self) -> bool:
        return self.variant == "embedding" or self.family in _EMBEDDING_FAMILIES


def parse_model_name(name: str) -> ModelName:
    """Read family, version, size, variant and quantisation out of a model name."""
    text = re.sub(r"\.gguf$", "", name.strip().lower().rsplit("/", 1)[-1])
    quant = None
    found = _QUANT_RE.search(text)
    if found:
        quant = found.group(1)
        text = text[:found.start(1)] + text[found.end(1):]
    family, version, params, variant = UNKNOWN_FAMILY, None, None, None
    for word in (w for w in _SPLIT_RE.split(text) if w):
        if family == UNKNOWN_FAMILY and (match := _FAMILY_RE.match(word)):
            family, version = match.group(1), match.group(2)
        elif family != UNKNOWN_FAMILY and version is None and (match := _VERSION_RE.match(word)):
            version = match.group(1)
        elif params is None and (size := _SIZE_RE.match(word)):
            experts, value, unit = size.groups()
            params = float(value) * (1.0 if unit == "b" else 1e-3) * (int(experts) if experts else 1)
        elif params is None and family == "phi" and word in _NAMED_SIZES:  # phi-3-mini, phi-3-medium
            params = _NAMED_SIZES[word]
        elif word in _VARIANTS:
            found_variant = _VARIANTS[word]
            if variant is None or _VARIANT_RANK[found_variant] > _VARIANT_RANK[variant]:
                variant = found_variant
    if family in _EMBEDDING_FAMILIES:
        variant = "embedding"
    elif family == "gpt" and variant is None:
        variant = "instruct"
    return ModelName(name, family, version, None if params is None else round(params, 6), variant, quant)


class SubstitutionMode(StrEnum):
    OFF = "off"
    SAME_FAMILY = "same-family"
    MAP = "map"


@dataclass(frozen=True, slots=True)
class SubstitutionPolicy:
    mode: SubstitutionMode = SubstitutionMode.OFF
    mapping: Mapping[str, str] | None = None
    """``map`` mode: requested name → a model this node serves."""

    @classmethod
    def from_config(cls, hub: HubConfig) -> SubstitutionPolicy:
        mapping = {}
        for index, entry in enumerate(hub.substitution_map):
            requested, sep, served = entry.partition("=")
            if not sep or not requested.strip() or not served.strip():
                raise ConfigError(f"hub.substitution_map[{index}]: expected \"requested=served\", got {entry!r}")
            mapping[requested.strip()] = served.strip()
        if hub.substitution == "map" and not mapping:
            raise ConfigError("hub.substitution = \"map\" needs entries in hub.substitution_map")
        return cls(SubstitutionMode(hub.substitution), mapping)


class UnknownFamilyError(ValueError):
    """The requested name parses to the ``unknown`` family: nothing to substitute it with."""


def choose_substitute(requested: str, available: Iterable[str], policy: SubstitutionPolicy) -> str | None:
    """The model to serve ``requested`` with, or None (no substitute under this policy).

    Raises :class:`UnknownFamilyError` under ``same-family`` when the name cannot be read."""
    names = list(available)
    if policy.mode is SubstitutionMode.OFF:
        return None
    if policy.mode is SubstitutionMode.MAP:
        target = (policy.mapping or {}).get(requested)
        return target if target in names else None
    wanted = parse_model_name(requested)
    if not wanted.known:
        raise UnknownFamilyError(requested)
    candidates = [(name, parse_model_name(name)) for name in names]
    same = [(n, p) for n, p in candidates if p.family == wanted.family and p.embedding == wanted.embedding]
    if not same:
        return None
    return min(same, key=lambda item: _distance(wanted, item[1]))[0]


def _distance(wanted: ModelName, have: ModelName) -> tuple[int, float, float, float, float]:
    variant = 0 if have.variant == wanted.variant else 1
    version = _version_gap(wanted.version, have.version)
    size = _size_gap(wanted.params_b, have.params_b)
    smaller = have.params_b if have.params_b is not None else math.inf  # a tie goes to the smaller
    return variant, version, size, smaller, -_quant_bits(have.quantization)


def _version_gap(wanted: str | None, have: str | None) -> float:
    if wanted is None or have is None:
        return 0.0 if wanted == have else 0.5
    try:
        return abs(float(wanted) - float(have))
    except ValueError:
        return 1.0


def _size_gap(wanted: float | None, have: float | None) -> float:
    if wanted is None or have is None:
        return 0.0 if wanted == have else 1.0
    return abs(math.log(max(have, 1e-6) / max(wanted, 1e-6)))


def _quant_bits(quant: str | None) -> float:
    if quant is None:
        return 0.0
    if quant in _QUANT_BITS:
        return _QUANT_BITS[quant]
    match = re.match(r"i?q(\d)", quant)
    return float(match.group(1)) if match else 0.0
