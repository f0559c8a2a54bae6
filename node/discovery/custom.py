"""Custom discovery: ``offload.custom_discovery = "module:function"``, called periodically.

The function (sync or async, no arguments) returns an iterable of peer-like items:
dicts with the reference's camelCase keys (``baseUrl``, ``deviceId``, ``deviceName``,
``appId``, ``loadedModels``, ``capability``) or snake_case ones, or objects with those
attributes (a ``Peer`` works). ``baseUrl`` is required. Each item becomes a seed that
is health-checked like a static peer (``via: "custom"``). A call that fails, times out
or returns garbage is logged and leaves the previous result in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from ..common.device_ids import is_valid_device_id
from ..common.errors import ConfigError
from ..constants import CUSTOM_DISCOVERY_TIMEOUT_S, MAX_CUSTOM_PEERS, MAX_DEVICE_NAME_CHARS
from .logonce import WarnOnce
from .model import PeerSeed
from .validate import clean_capability, clean_models, clean_text, normalize_base_url

_log = logging.getLogger(__name__)

CustomDiscoveryFunction = Callable[[], Any]
SeedsSink = Callable[[tuple[PeerSeed, ...]], None]


def load_custom_discovery(spec: str) -> CustomDiscoveryFunction:
    """Import ``module:function``; a ``ConfigError`` names what is wrong."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"offload.custom_discovery: expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a config problem
        raise ConfigError(f"offload.custom_discovery: cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ConfigError(f"offload.custom_discovery: {spec!r} is not a callable in {module_name!r}")
    return cast(CustomDiscoveryFunction, target)


def seeds_from_custom_result(result: object, problems: list[str]) -> tuple[PeerSeed, ...]:
    """Validate what a custom discovery function returned (pure)."""
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        raise ValueError(f"returned {type(result).__name__}, not a list of peers")
    seeds: dict[str, PeerSeed] = {}
    for index, item in enumerate(result):
        if index >= MAX_CUSTOM_PEERS:
            problems.append(f"more than {MAX_CUSTOM_PEERS} peers; the rest ignored")
            break
        try:
            seed = _seed_from_item(item, problems)
        except ValueError as exc:
            problems.append(f"peer #{index} ignored: {exc}")
            continue
        seeds.setdefault(seed.base_url, seed)
    return tuple(seeds.values())


class CustomDiscovery:
    """Calls the function every ``interval`` seconds and hands the seeds to ``on_seeds``."""

    def __init__(
        self,
        *,
        spec: str,
        function: CustomDiscoveryFunction,
        interval: float,
        on_seeds: SeedsSink,
        warn: WarnOnce | None = None,
    ) -> None:
        self._spec = spec
        self._function = function
        self._interval = max(interval, 0.1)
        self._timeout = min(CUSTOM_DISCOVERY_TIMEOUT_S, self._interval)
        self._on_seeds = on_seeds
        self._warn = warn or WarnOnce(_log)
        self._task: asyncio.Task[None] | None = None
        self._thread_busy = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="dvai-custom-discovery")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run_once(self) -> bool:
        """One call; True when it produced a (validated) result."""
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._call()
            problems: list[str] = []
            seeds = seeds_from_custom_result(result, problems)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            self._warn.warn(("custom", self._spec, type(exc).__name__),
                            "custom discovery %s failed: %s", self._spec,
                            str(exc) or f"{type(exc).__name__} (limit {self._timeout:g} s)")
            return False
        for problem in problems:
            self._warn.warn(("custom", self._spec, problem), "custom discovery %s: %s", self._spec, problem)
        self._on_seeds(seeds)
        return True

    async def _call(self) -> object:
        if inspect.iscoroutinefunction(self._function):
            return await self._function()
        if self._thread_busy:
            raise TimeoutError("the previous call is still running")
        self._thread_busy = True  # cleared by the thread itself, even after a timeout here
        result = await asyncio.to_thread(self._call_in_thread)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _call_in_thread(self) -> object:
        try:
            return self._function()
        finally:
            self._thread_busy = False

    async def _run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self._interval)


def _seed_from_item(item: object, problems: list[str]) -> PeerSeed:
    def field(*names: str) -> Any:
        for name in names:
            if isinstance(item, Mapping):
                if name in item:
                    return item[name]
            elif hasattr(item, name):
                return getattr(item, name)
        return None

    base_url = normalize_base_url(field("baseUrl", "base_url"))
    device_id = field("deviceId", "device_id")
    if device_id is not None and not is_valid_device_id(device_id):
        raise ValueError(f"deviceId {str(device_id)[:40]!r} is not a device id")
    models = field("loadedModels", "loaded_models") or ()
    capability = field("capability") or {}
    if isinstance(models, (str, bytes)) or not isinstance(models, Iterable):
        problems.append("loadedModels is not a list; ignored")
        models = ()
    if not isinstance(capability, Mapping):
        problems.append("capability is not a map; ignored")
        capability = {}
    app_id = clean_text(field("appId", "app_id"), 128)
    return PeerSeed(
        base_url=base_url,
        source="custom",
        device_id=device_id,
        device_name=clean_text(field("deviceName", "device_name", "name"), MAX_DEVICE_NAME_CHARS),
        app_id=app_id or None,
        loaded_models=clean_models(models, problems),
        capability=clean_capability(capability, problems),
    )
