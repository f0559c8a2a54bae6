"""``dvai-node probe``: load one model in-process, probe it with a progress bar, persist."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TextIO

from ..capability.probe import check_probe_tokens
from ..capability.score import CapabilityScore
from ..capability.service import CapabilityService
from ..capability.store import CapabilityStore
from ..common.errors import DVAIError
from ..config import ModelConfig, NodeConfig, model_id_for_path
from ..engine.registry import ModelRegistry
from .base import add_config_option, add_log_level_option, add_state_dir_option

DESCRIPTION = (
    "Load the model in this process, time a cold run of N decode tokens (end of sequence suppressed) and "
    "save the score in the state dir's capability.json, where a node with offload enabled reuses it. Runs "
    "even when offload is disabled: it is an explicit request (GET /v1/dvai/capability and POST "
    "/v1/dvai/probe need offload enabled)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    # ``--model`` here names a configured model (or a file) to probe; it does not replace the models.
    add_config_option(parser)
    add_state_dir_option(parser, "where capability.json is saved")
    parser.add_argument("--model", dest="probe_model", metavar="ID|PATH",
                        help="a configured model id or alias (default: the default model), or a GGUF file")
    parser.add_argument("--tokens", type=int, metavar="N", help="decode tokens to time (default: "
                        "offload.probe_tokens, 50)")
    add_log_level_option(parser)


def run(args: argparse.Namespace, config: NodeConfig) -> int:
    try:
        return asyncio.run(probe_command(config, model=args.probe_model, tokens=args.tokens))
    except KeyboardInterrupt:
        return 130


def config_for_probe(config: NodeConfig, model: str | None) -> tuple[NodeConfig, str]:
    """The config to load and the model id to probe: ``model`` is a configured id or alias,
    or the path of a GGUF file (served under its file name, as ``serve --model`` does)."""
    if model is None:
        return config, config.default_model_id
    names = {name for m in config.models for name in (m.id, *m.aliases)}
    if model not in names and Path(model).expanduser().is_file():
        model_id = model_id_for_path(model)
        return config.replace(models=(ModelConfig(id=model_id, path=model),), default_model=None), model_id
    return config, model


def describe(score: CapabilityScore) -> str:
    prompt = "" if score.prompt_tok_per_s is None else f", prompt {score.prompt_tok_per_s:.1f} tok/s"
    library = "SIMULATED engine" if score.library_version == "simulated" else (
        f"llama-cpp-python {score.library_version}")
    line = (f"{score.model_id}: {score.tok_per_s:.1f} tok/s decode{prompt} "
            f"({score.source} of {score.samples} tokens, {library})")
    if len(score.curve) > 1:
        points = ", ".join(f"{level}: {rate:.1f}" for level, rate in score.curve)
        line += f"\naggregate tok/s by concurrent sequences: {points}"
    return line


async def probe_command(config: NodeConfig, *, model: str | None = None, tokens: int | None = None,
                        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one probe whether or not offload is enabled (it is an explicit request)."""
    from tqdm import tqdm

    config, model_id = config_for_probe(config, model)
    registry = await asyncio.to_thread(ModelRegistry.from_config, config)  # may assemble the model
    store = CapabilityStore(config.resolved_state_dir())
    service = CapabilityService(config, registry, store)
    try:
        slot = registry.resolve(model_id)
        count = check_probe_tokens(config.offload.probe_tokens if tokens is None else tokens)
        print(f"loading {slot.info.id} ({slot.info.path})", file=out, flush=True)
        await slot.ensure_loaded()
        with tqdm(total=count, desc=f"probing {slot.info.id}", unit="tok", file=err, disable=None) as bar:

            def advance() -> None:
                if bar.n < count:
                    bar.update(1)

            score = await service.run_probe(slot.info.id, count, on_token=advance)
        print(describe(score), file=out)
        print(f"saved to {store.path}", file=out, flush=True)
        return 0
    except DVAIError as exc:
        print(f"dvai-node probe: {exc.message}", file=err)
        return 1
    finally:
        await service.stop()
        await registry.stop()
