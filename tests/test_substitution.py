"""The model-name parser and the substitution policy, table-driven over real model names."""

from __future__ import annotations

import pytest

from node.hub.substitution import (
    UNKNOWN_FAMILY,
    SubstitutionMode,
    SubstitutionPolicy,
    UnknownFamilyError,
    choose_substitute,
    parse_model_name,
)

# name → (family, version, params in billions, variant, quantisation)
NAMES: list[tuple[str, tuple[str, str | None, float | None, str | None, str | None]]] = [
    # GGUF file names
    ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", ("llama", "3.1", 8.0, "instruct", "q4_k_m")),
    ("Meta-Llama-3-70B-Instruct.Q2_K.gguf", ("llama", "3", 70.0, "instruct", "q2_k")),
    ("llama-2-7b-chat.Q8_0.gguf", ("llama", "2", 7.0, "instruct", "q8_0")),
    ("Llama-3.2-1B-Instruct-f16.gguf", ("llama", "3.2", 1.0, "instruct", "f16")),
    ("Qwen2.5-Coder-7B-Instruct-Q5_K_M.gguf", ("qwen", "2.5", 7.0, "coder", "q5_k_m")),
    ("qwen2.5-0.5b-instruct-q8_0.gguf", ("qwen", "2.5", 0.5, "instruct", "q8_0")),
    ("Qwen3-4B-Q4_K_M.gguf", ("qwen", "3", 4.0, None, "q4_k_m")),
    ("gemma-3-270m-it-Q4_K_M.gguf", ("gemma", "3", 0.27, "instruct", "q4_k_m")),
    ("gemma-2-2b-it-IQ4_XS.gguf", ("gemma", "2", 2.0, "instruct", "iq4_xs")),
    ("Gemma3-270M-Q4_K_M.gguf", ("gemma", "3", 0.27, None, "q4_k_m")),
    ("phi-3-mini-4k-instruct.Q4_0.gguf", ("phi", "3", 3.8, "instruct", "q4_0")),
    ("Phi-3-medium-128k-instruct-Q6_K.gguf", ("phi", "3", 14.0, "instruct", "q6_k")),
    ("Mistral-7B-Instruct-v0.3.Q4_K_M.gguf", ("mistral", "0.3", 7.0, "instruct", "q4_k_m")),
    ("mixtral-8x7b-instruct-v0.1.Q3_K_M.gguf", ("mixtral", "0.1", 56.0, "instruct", "q3_k_m")),
    ("DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf", ("deepseek", None, 7.0, "reasoning", "q4_k_m")),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", ("smollm", "2", 0.135, "instruct", "q4_1")),
    ("SmolLM2-1.7B-Instruct-Q8_0.gguf", ("smollm", "2", 1.7, "instruct", "q8_0")),
    ("tinyllama-1.1b-chat-v1.0.Q5_K_M.gguf", ("tinyllama", "1.0", 1.1, "instruct", "q5_k_m")),
    ("codellama-13b-instruct.Q4_K_S.gguf", ("codellama", None, 13.0, "instruct", "q4_k_s")),
    ("starcoder2-3b-Q4_K_M.gguf", ("starcoder", "2", 3.0, None, "q4_k_m")),
    ("nomic-embed-text-v1.5.f16.gguf", ("nomic", "1.5", None, "embedding", "f16")),
    ("bge-small-en-v1.5-q8_0.gguf", ("bge", "1.5", None, "embedding", "q8_0")),
    ("granite-3.1-8b-instruct-Q4_K_M.gguf", ("granite", "3.1", 8.0, "instruct", "q4_k_m")),
    # Ollama tags
    ("llama3.1:8b", ("llama", "3.1", 8.0, None, None)),
    ("llama3.1:8b-instruct-q4_K_M", ("llama", "3.1", 8.0, "instruct", "q4_k_m")),
    ("llama3.2:3b-text-q8_0", ("llama", "3.2", 3.0, None, "q8_0")),
    ("qwen2.5-coder:7b", ("qwen", "2.5", 7.0, "coder", None)),
    ("qwen2.5:72b-instruct-q4_0", ("qwen", "2.5", 72.0, "instruct", "q4_0")),
    ("gemma2:2b", ("gemma", "2", 2.0, None, None)),
    ("gemma3:270m", ("gemma", "3", 0.27, None, None)),
    ("mistral:7b-instruct-v0.3-q4_0", ("mistral", "0.3", 7.0, "instruct", "q4_0")),
    ("mixtral:8x7b", ("mixtral", None, 56.0, None, None)),
    ("deepseek-r1:7b", ("deepseek", None, 7.0, "reasoning", None)),
    ("smollm2:135m", ("smollm", "2", 0.135, None, None)),
    ("codellama:7b-code", ("codellama", None, 7.0, "coder", None)),
    ("llava:7b", ("llava", None, 7.0, None, None)),
    ("nomic-embed-text:latest", ("nomic", None, None, "embedding", None)),
    ("all-minilm", ("minilm", None, None, "embedding", None)),
    ("phi3:mini", ("phi", "3", 3.8, None, None)),
    # OpenAI-style ids and our own
    ("gpt-4o-mini", ("gpt", None, None, "instruct", None)),
    ("gpt-3.5-turbo", ("gpt", "3.5", None, "instruct", None)),
    ("gemma3-270m", ("gemma", "3", 0.27, None, None)),
    ("smollm2-135m-instruct", ("smollm", "2", 0.135, "instruct", None)),
    # unreadable: the sentinel
    ("model.gguf", (UNKNOWN_FAMILY, None, None, None, None)),
    ("my-finetune-v2", (UNKNOWN_FAMILY, None, None, None, None)),
    ("ggml-model-Q4_0.gguf", (UNKNOWN_FAMILY, None, None, None, "q4_0")),
]


@pytest.mark.parametrize(("name", "expected"), NAMES, ids=[n for n, _ in NAMES])
def test_names_parse(name: str, expected: tuple[str, str | None, float | None, str | None, str | None]) -> None:
    parsed = parse_model_name(name)
    assert (parsed.family, parsed.version, parsed.params_b, parsed.variant, parsed.quantization) == expected
    assert parsed.known == (expected[0] != UNKNOWN_FAMILY)


def test_the_table_is_large_enough() -> None:
    assert len(NAMES) >= 40


SAME_FAMILY = SubstitutionPolicy(SubstitutionMode.SAME_FAMILY)
HAVE = ["llama3.2:3b-instruct-q8_0", "llama3.1:8b-instruct-q4_K_M", "llama3.1:8b-instruct-q8_0",
        "qwen2.5-coder:7b", "qwen2.5:7b-instruct", "gemma3-270m", "nomic-embed-text", "mistral:7b-instruct-v0.3"]


@pytest.mark.parametrize(("requested", "served"), [
    ("llama3.1:70b-instruct", "llama3.1:8b-instruct-q8_0"),    # same version, nearest size, higher precision
    ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "llama3.1:8b-instruct-q8_0"),
    ("llama3.2:1b-instruct", "llama3.2:3b-instruct-q8_0"),      # same version wins over size
    ("qwen2.5-coder:32b", "qwen2.5-coder:7b"),                  # same variant (coder)
    ("qwen2.5:3b-instruct", "qwen2.5:7b-instruct"),
    ("gemma-3-1b-it", "gemma3-270m"),
    ("mistral:latest", "mistral:7b-instruct-v0.3"),
    ("bge-small-en", None),                                      # no bge here; nomic is another family
    ("phi3:mini", None),                                         # no phi at all
])
def test_same_family_substitution(requested: str, served: str | None) -> None:
    assert choose_substitute(requested, HAVE, SAME_FAMILY) == served


def test_embedding_and_generative_models_never_stand_in_for_each_other() -> None:
    assert choose_substitute("nomic-embed-text:v1.5", HAVE, SAME_FAMILY) == "nomic-embed-text"
    assert choose_substitute("nomic-embed-text", ["gemma3-270m"], SAME_FAMILY) is None


def test_unknown_families_are_refused_not_guessed() -> None:
    with pytest.raises(UnknownFamilyError):
        choose_substitute("my-finetune-v2", HAVE, SAME_FAMILY)


def test_off_and_map_modes() -> None:
    assert choose_substitute("llama3.1:70b", HAVE, SubstitutionPolicy()) is None
    mapped = SubstitutionPolicy(SubstitutionMode.MAP, {"gpt-4o-mini": "qwen2.5:7b-instruct", "x": "absent"})
    assert choose_substitute("gpt-4o-mini", HAVE, mapped) == "qwen2.5:7b-instruct"
    assert choose_substitute("x", HAVE, mapped) is None  # a map target this node lacks is no substitute
    assert choose_substitute("gpt-4o", HAVE, mapped) is None
