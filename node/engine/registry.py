"""The node's models by id and alias: building, preloading, and idle unloading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from ..catalog import CatalogModel
from ..common.errors import ModelNotFoundError
from ..config import ModelConfig, NodeConfig
from .base import Engine, ModelInfo
from .slot import ModelSlot, SlotState

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 5.0
"""seconds between checks for models idle past their keep_alive."""


def build_engine(model: ModelConfig, *, cache_dir: Path | None = None) -> Engine:
    """An engine for one model entry (resolving a built-in model's path, assembling it if needed)."""
    if model.engine == "simulated":
        from .simulated import SimulatedEngine

        entry = catalog_entry(model)
        info = ModelInfo(
            id=model.id, path="simulated", ctx_size=model.ctx_size, embedding=model.embedding,
            aliases=model.aliases, owned_by="dvai-mesh-simulated", grammar=False,
            catalog=entry.name if entry is not None else None,
        )
        return SimulatedEngine(info, tok_per_s=model.simulated_tok_per_s)
    from ..catalog import materialize
    from .default_model import builtin_model_for
    from .llama import LlamaEngine

    entry = catalog_entry(model)
    unavailable, defaults, threads = None, None, model.threads
    if model.path:
        path = Path(model.path).expanduser()
    elif model.catalog is not None and entry is not None:
        try:
            path = materialize(entry, cache_dir)
        except (OSError, ValueError) as exc:  # reported when the model is loaded
            path, unavailable = Path(f"<catalogue {entry.name}>"), str(exc)
    else:
        builtin = builtin_model_for(model.id)
        defaults, threads = builtin.defaults, threads or builtin.threads
        try:
            path = builtin.locate(cache_dir, None)
        except (OSError, ValueError, ImportError) as exc:  # reported when the model is loaded
            path, unavailable = Path(f"<built-in {model.id}>"), str(exc)
    size = path.stat().st_size if path.is_file() else 0
    info = ModelInfo(
        id=model.id, path=str(path), ctx_size=model.ctx_size, embedding=model.embedding,
        aliases=model.aliases, chat_format=model.chat_format, size_bytes=size,
        catalog=entry.name if entry is not None else None,
    )
    return LlamaEngine(
        info, threads=threads, gpu_layers=model.gpu_layers,
        reasoning_budget=model.reasoning_budget, seed=model.seed, parallel=model.parallel,
        prompt_cache_bytes=model.prompt_cache_mib * 1024 * 1024, unavailable=unavailable, defaults=defaults,
    )


def catalog_entry(model: ModelConfig) -> CatalogModel | None:
    """The catalogue entry a model config names (``catalog``), or the built-in default model's
    when it names neither a path nor an entry; None for a model given by path."""
    from ..catalog import BUILT_IN, DEFAULT_CHAT_MODEL, lookup

    if model.catalog is not None:
        return lookup(model.catalog)
    if model.path:
        return None
    return next((m for m in BUILT_IN if m.id == model.id), DEFAULT_CHAT_MODEL)  # as builtin_model_for


class ModelRegistry:
    def __init__(self, slots: list[tuple[ModelConfig, ModelSlot]], default_id: str) -> None:
        self._configs = {cfg.id: cfg for cfg, _ in slots}
        self._slots = {slot.info.id: slot for _, slot in slots}
        self._names: dict[str, str] = {}
        for cfg, slot in slots:
            for name in (slot.info.id, *cfg.aliases):
                self._names[name] = slot.info.id
        self.default_id = default_id
        self._reaper: asyncio.Task[None] | None = None
        self._preload: asyncio.Task[None] | None = None
        self.started_at = time.time()

    @classmethod
    def from_config(cls, config: NodeConfig) -> ModelRegistry:
        slots = []
        for model in config.models:
            engine = build_engine(model, cache_dir=config.cache_dir)
            slots.append(
                (model, ModelSlot(engine, queue_depth=model.queue_depth, keep_alive=model.keep_alive))
            )
        return cls(slots, config.default_model_id)

    # -- lookup ------------------------------------------------------------
    def resolve(self, name: str) -> ModelSlot:
        model_id = self._names.get(name)
        if model_id is None:
            raise ModelNotFoundError(name, sorted(self._slots))
        return self._slots[model_id]

    def slots(self) -> list[ModelSlot]:
        return list(self._slots.values())

    def serves(self, name: str) -> bool:
        return name in self._names

    @property
    def ready(self) -> bool:
        """Every preloaded model is loaded, or was and was unloaded on purpose (keep_alive, the admin
        call: the next request loads it again): the health endpoint's ``ok`` vs ``loading``."""
        return all(
            slot.state is SlotState.READY or (slot.has_loaded and slot.state is not SlotState.FAILED)
            for slot in self._preloaded()
        )

    @property
    def loading(self) -> bool:
        """A preloaded model is still on its way to its first load (not yet ready, not failed)."""
        return any(
            not slot.has_loaded and slot.state in (SlotState.UNLOADED, SlotState.LOADING)
            for slot in self._preloaded()
        )

    def _preloaded(self) -> list[ModelSlot]:
        return [self._slots[model_id] for model_id, cfg in self._configs.items() if cfg.preload]

    @property
    def failed(self) -> list[ModelSlot]:
        return [s for s in self._slots.values() if s.state is SlotState.FAILED]

    # -- lifecycle ---------------------------------------------------------
    async def start(self, *, wait: bool = True) -> None:
        """Preload models (now, or in the background with ``wait=False``) and start the reaper."""
        if wait:
            await self._load_preloaded()
        else:
            self._preload = asyncio.create_task(self._load_preloaded(), name="preload-models")
        self._reaper = asyncio.create_task(self._reap_idle(), name="model-reaper")

    async def wait_preloaded(self) -> None:
        """Return once preloading has finished (successfully or not)."""
        if self._preload is not None:
            await asyncio.shield(self._preload)

    async def _load_preloaded(self) -> None:
        slots = [self._slots[i] for i, cfg in self._configs.items() if cfg.preload]
        results = await asyncio.gather(*(s.ensure_loaded() for s in slots), return_exceptions=True)
        for slot, result in zip(slots, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not preload model %s: %s", slot.info.id, result)

    async def stop(self) -> None:
        for task in (self._preload, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for slot in self._slots.values():
            await slot.close()

    async def _reap_idle(self) -> None:
        keep_alives = [s.keep_alive for s in self._slots.values() if s.keep_alive is not None]
        interval = min([REAP_INTERVAL_S, *(max(0.05, k / 2) for k in keep_alives)])
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for slot in self._slots.values():
                left = slot.keep_alive_left(now)
                if left is not None and left <= 0 and not slot.busy:
                    try:
                        await slot.unload()
                    except Exception:  # noqa: BLE001 - one model's failure must not stop the reaper
                        log.exception("could not unload idle model %s", slot.info.id)
