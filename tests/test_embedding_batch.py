"""Batched embeddings: several inputs and several requests in one ``llama_decode``.

The batch planner is tested with plain data; the rest runs the real llama.cpp engine on the
default model loaded in embedding mode (the model the other embedding tests use), in process
through a ``ModelSlot`` and over HTTP through a real node.

Agreement between a batched and a one-at-a-time vector: llama.cpp's CPU kernels are not
batch-invariant (an input's tokens sit in other KV cells and SIMD lanes when other sequences
share the batch; the tiny rounding differences are amplified by the 8-bit quantisation of the
activations). Measured on this model: cosine ≥ 0.9985 (most inputs ≥ 0.99995, a two-token
input lowest), the same spread llama-cpp-python's own ``Llama.embed`` shows between its batched
and single calls. So the tests assert: exact equality with ``Llama.embed`` for the same batch
(the engine it replaced), cosine ≥ 0.998 against the solo vector, and that every batched
vector is nearer its own input's solo vector than any other input's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import openai
import pytest

from node.common.errors import InvalidRequestError
from node.engine.base import EmbeddingResult, ModelInfo
from node.engine.embedding import plan_batch
from node.engine.llama import LlamaEngine
from node.engine.slot import ModelSlot, SlotState

from .conftest import NodeProcess, start_node_process

TEXTS = (
    "a cat", "a kitten", "tax law", "the quick brown fox jumps over the lazy dog",
    "x", "hello world, this is a test of embeddings", "the tax code", "kitten",
    "Paris is the capital of France", "def fibonacci(n): return n", "rain in Spain",
    "quantum mechanics", "a small dog barks", "bread and butter", "mountain", "blue sky at noon",
)
MIN_COSINE = 0.998  # measured ≥ 0.9985: see the module docstring


# -- the planner (plain data) -------------------------------------------------------


def test_plan_takes_inputs_round_robin_up_to_the_token_limit() -> None:
    # job 0 has three inputs, job 1 two, job 2 one: one of each in turn
    assert plan_batch([[10, 10, 10], [10, 10], [10]], max_tokens=1000, max_seqs=100) == [3, 2, 1]
    assert plan_batch([[10, 10, 10], [10, 10], [10]], max_tokens=40, max_seqs=100) == [2, 1, 1]


def test_plan_respects_the_sequence_limit() -> None:
    assert plan_batch([[1] * 5, [1] * 5], max_tokens=1000, max_seqs=3) == [2, 1]
    assert plan_batch([[1] * 5], max_tokens=1000, max_seqs=4) == [4]


def test_plan_keeps_a_jobs_order_when_its_next_input_does_not_fit() -> None:
    # job 0's second input (90) does not fit after 10 + 5: job 0 stops, job 1 goes on
    assert plan_batch([[10, 90, 1], [5, 5, 5]], max_tokens=30, max_seqs=100) == [1, 3]


def test_plan_always_fits_the_first_input_and_handles_empty_jobs() -> None:
    assert plan_batch([[], [64]], max_tokens=64, max_seqs=1) == [0, 1]
    assert plan_batch([], max_tokens=64, max_seqs=4) == []


# -- the real engine ----------------------------------------------------------------

def cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def assert_matches_solo(vectors: list[list[float]], texts: tuple[str, ...], solo: dict[str, list[float]]) -> None:
    """Each vector agrees with its own input's solo vector, and is nearest to it."""
    for vector, text in zip(vectors, texts, strict=True):
        assert cosine(vector, solo[text]) >= MIN_COSINE, text
        nearest = max(solo, key=lambda other: cosine(vector, solo[other]))
        assert nearest == text


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[LlamaEngine]:
    info = ModelInfo(id="embed", path=str(default_model), ctx_size=256, embedding=True)
    loaded = LlamaEngine(info, threads=1, parallel=8)  # 1 thread: robust on a loaded machine
    loaded.load()
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(scope="module")
def solo(engine: LlamaEngine) -> dict[str, list[float]]:
    """Every text embedded alone (one request, one input, one decode)."""
    return {text: engine.embed([text]).vectors[0] for text in TEXTS}


@pytest.fixture
async def slot(engine: LlamaEngine) -> AsyncIterator[ModelSlot]:
    model_slot = ModelSlot(engine, queue_depth=16)
    model_slot.state = SlotState.READY
    try:
        yield model_slot
    finally:
        model_slot.executor.shutdown(wait=True)


def count_tokens(engine: LlamaEngine, text: str) -> int:
    """Tokens of one input as the engine counts them (BOS included)."""
    return len(engine._model.tokenize(text.encode(), add_bos=True, special=False))


def decodes(engine: LlamaEngine) -> int:
    return int(engine.stats()["embedding_decodes"])


@pytest.mark.engine
def test_one_request_is_one_decode_and_equals_llama_cpp_pythons_embed(
    engine: LlamaEngine, solo: dict[str, list[float]], default_model: Path
) -> None:
    import llama_cpp

    before = decodes(engine)
    result = engine.embed(list(TEXTS))
    assert decodes(engine) - before == 1  # 16 inputs, one llama_decode
    tokens = sum(count_tokens(engine, t) for t in TEXTS)
    assert result.prompt_tokens == tokens
    assert_matches_solo(result.vectors, TEXTS, solo)
    for vector in result.vectors:
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-9)
    # the engine this replaced: the same batch gives the same numbers
    reference = llama_cpp.Llama(
        model_path=str(default_model), n_ctx=256, n_threads=1, n_threads_batch=1, embedding=True,
        verbose=False, n_batch=256, n_ubatch=256, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    )
    try:
        expected, count = reference.embed(list(TEXTS), normalize=True, truncate=False, return_count=True)
    finally:
        reference.close()
    assert count == tokens
    assert max(float(np.abs(np.subtract(a, b)).max()) for a, b in zip(result.vectors, expected, strict=True)) == 0.0


@pytest.mark.engine
def test_inputs_beyond_the_batch_size_take_more_decodes_in_order(engine: LlamaEngine,
                                                                 solo: dict[str, list[float]]) -> None:
    long_text = " ".join(["word"] * 200)  # ~200 tokens of a 256-token batch: one per batch
    texts = (long_text, "a cat", long_text, "tax law")
    before = decodes(engine)
    result = engine.embed(list(texts))
    assert decodes(engine) - before == 2  # [long, cat] [long, tax law]
    assert cosine(result.vectors[0], result.vectors[2]) >= MIN_COSINE
    assert cosine(result.vectors[1], solo["a cat"]) >= MIN_COSINE
    assert cosine(result.vectors[3], solo["tax law"]) >= MIN_COSINE


async def _concurrent(slot: ModelSlot, requests: list[list[str]]) -> list[EmbeddingResult | BaseException]:
    """Start every request while the worker thread is held, so they all reach the collector
    before its first batch; then let it go."""
    hold = threading.Event()
    blocker = asyncio.get_running_loop().run_in_executor(slot.executor, hold.wait)
    tasks = [asyncio.create_task(slot.embed(inputs)) for inputs in requests]
    await asyncio.sleep(0.05)  # every task took its seat and submitted its job
    hold.set()
    await blocker
    return await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.engine
async def test_concurrent_requests_share_one_decode_with_their_own_vectors_and_usage(
    slot: ModelSlot, engine: LlamaEngine, solo: dict[str, list[float]]
) -> None:
    requests = [list(TEXTS[i:i + 1 + i % 3]) for i in range(8)]  # 8 requests of 1 to 3 inputs
    before = decodes(engine)
    results = await _concurrent(slot, requests)
    assert decodes(engine) - before == 1  # 8 requests, 16 inputs, one llama_decode
    for inputs, result in zip(requests, results, strict=True):
        assert isinstance(result, EmbeddingResult), result
        vectors = result.vectors
        assert len(vectors) == len(inputs)
        assert_matches_solo(vectors, tuple(inputs), solo)
        assert result.prompt_tokens == sum(count_tokens(engine, t) for t in inputs)


@pytest.mark.engine
async def test_a_short_request_is_not_starved_by_a_long_one(
    slot: ModelSlot, engine: LlamaEngine, solo: dict[str, list[float]]
) -> None:
    # 4 inputs of ~200 tokens fill a 256-token batch each; the ~100-token input of the second
    # request never fits next to one of them, so it needs a batch of its own: it gets the next
    # one, not the one after the long request's last input.
    long_inputs = [" ".join([word] * 199) for word in ("cat", "dog", "sun", "sea")]
    short = " ".join(["rain"] * 99)
    hold = threading.Event()
    blocker = asyncio.get_running_loop().run_in_executor(slot.executor, hold.wait)
    long_task = asyncio.create_task(slot.embed(long_inputs))
    short_task = asyncio.create_task(slot.embed([short]))
    await asyncio.sleep(0.05)
    before = decodes(engine)
    hold.set()
    await blocker
    done, _ = await asyncio.wait({long_task, short_task}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {short_task}
    assert len((await long_task).vectors) == 4
    assert decodes(engine) - before == 5  # one input per batch: neither fits next to another
    alone = await slot.embed([short])
    assert cosine((await short_task).vectors[0], alone.vectors[0]) >= MIN_COSINE


@pytest.mark.engine
async def test_a_too_long_input_fails_only_its_own_request(
    slot: ModelSlot, engine: LlamaEngine, solo: dict[str, list[float]]
) -> None:
    too_long = " ".join(["word"] * 400)  # > 256 tokens
    requests = [["a cat", "tax law"], ["kitten", too_long], ["mountain"]]
    results = await _concurrent(slot, requests)
    assert isinstance(results[1], InvalidRequestError)
    assert results[1].code == "context_length_exceeded" and results[1].param == "input"
    assert "input[1] is" in results[1].message and "the limit for 'embed' is 256" in results[1].message
    first, last = results[0], results[2]
    assert isinstance(first, EmbeddingResult) and isinstance(last, EmbeddingResult)
    assert_matches_solo(first.vectors, ("a cat", "tax law"), solo)
    assert_matches_solo(last.vectors, ("mountain",), solo)


@pytest.mark.engine
async def test_a_cancelled_request_is_dropped_and_the_others_complete(
    slot: ModelSlot, engine: LlamaEngine, solo: dict[str, list[float]]
) -> None:
    hold = threading.Event()
    blocker = asyncio.get_running_loop().run_in_executor(slot.executor, hold.wait)
    keep = asyncio.create_task(slot.embed(["a cat", "rain in Spain"]))
    leave = asyncio.create_task(slot.embed(list(TEXTS)))
    await asyncio.sleep(0.05)
    assert slot.active_sequences == 2  # both requests hold a seat in the collector
    leave.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert slot.active_sequences == 1  # the cancelled one gave its seat back without waiting
    inputs_before = engine.stats()["embedding_inputs"]
    hold.set()
    await blocker
    result = await keep
    assert_matches_solo(result.vectors, ("a cat", "rain in Spain"), solo)
    with pytest.raises(asyncio.CancelledError):
        await leave
    await asyncio.get_running_loop().run_in_executor(slot.executor, lambda: None)  # the collector has returned
    assert engine.stats()["embedding_inputs"] - inputs_before == 2  # its 16 inputs were never decoded
    assert engine.stats()["embedding_jobs"] == 0


# -- over HTTP, through a real node -------------------------------------------------


@pytest.fixture(scope="module")
def embed_node(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[NodeProcess]:
    config = f"""
[models.embed]
path = "{default_model}"
embedding = true
ctx_size = 256
parallel = 8
threads = 1
"""
    node = start_node_process(tmp_path_factory.mktemp("embed-node"), config_text=config)
    try:
        yield node
    finally:
        node.stop()


async def metric(node: NodeProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(node.root + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + '{model="embed"}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.engine
async def test_concurrent_http_requests_are_batched(
    embed_node: NodeProcess, engine: LlamaEngine, solo: dict[str, list[float]]
) -> None:
    api = openai.AsyncOpenAI(base_url=embed_node.base_url, api_key="unused", max_retries=0, timeout=120)
    too_long = " ".join(["word"] * 400)
    requests: list[list[str]] = [[TEXTS[2 * i], TEXTS[2 * i + 1]] for i in range(8)]
    requests[3] = ["kitten", too_long]
    decodes_before = await metric(embed_node, "dvai_engine_embedding_decodes_total")
    inputs_before = await metric(embed_node, "dvai_engine_embedding_inputs_total")
    async with api:
        results = await asyncio.gather(
            *(api.embeddings.create(model="embed", input=inputs, encoding_format="float") for inputs in requests),
            return_exceptions=True,
        )
    failed = results[3]
    assert isinstance(failed, openai.BadRequestError)
    assert failed.body["code"] == "context_length_exceeded"  # type: ignore[index]
    for index, (inputs, result) in enumerate(zip(requests, results, strict=True)):
        if index == 3:
            continue
        assert isinstance(result, openai.types.CreateEmbeddingResponse), result
        assert [item.index for item in result.data] == [0, 1]
        assert_matches_solo([item.embedding for item in result.data], tuple(inputs), solo)
        assert result.usage.prompt_tokens == sum(count_tokens(engine, text) for text in inputs)
    decoded = await metric(embed_node, "dvai_engine_embedding_inputs_total") - inputs_before
    calls = await metric(embed_node, "dvai_engine_embedding_decodes_total") - decodes_before
    assert decoded == 14  # 7 good requests × 2 inputs; the failed request decoded nothing
    assert 1 <= calls < 7  # fewer decodes than requests (measured: 1 or 2)
