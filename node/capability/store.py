"""Probe scores on disk: ``<state_dir>/capability.json``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..common.fsutil import atomic_write_json, read_json
from ..constants import CAPABILITY_FILE_MAX_BYTES, CAPABILITY_STORE_MAX_ENTRIES
from .score import CapabilityScore

log = logging.getLogger(__name__)

CAPABILITY_FILE = "capability.json"
STORE_FORMAT_VERSION = 1


class CapabilityStore:
    """Probe scores keyed by (model id, library version), written atomically with mode 0600.

    Each entry also records the model file's size in bytes and a lookup with another size
    misses, so a replaced model file (another quantisation, another model under the same
    id) is probed again. The size rather than the path: moving a file keeps its score.
    ``load`` and ``save`` block on file I/O: call them off the event loop.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / CAPABILITY_FILE
        self._entries: dict[tuple[str, str], tuple[int, CapabilityScore]] = {}
        self.loaded = False

    def get(self, model_id: str, library_version: str, size_bytes: int) -> CapabilityScore | None:
        entry = self._entries.get((model_id, library_version))
        if entry is None or entry[0] != size_bytes:
            return None
        return entry[1]

    def latest(self, model_id: str, size_bytes: int) -> CapabilityScore | None:
        """The most recent stored score of this model file, whatever library version measured it."""
        scores = [score for (mid, _), (size, score) in self._entries.items()
                  if mid == model_id and size == size_bytes]
        return max(scores, key=lambda score: score.measured_at, default=None)

    def put(self, score: CapabilityScore, size_bytes: int) -> None:
        """Remember ``score`` (replacing the entry for its key); the oldest goes past the cap."""
        self._entries[(score.model_id, score.library_version)] = (size_bytes, score)
        if len(self._entries) > CAPABILITY_STORE_MAX_ENTRIES:
            oldest = min(self._entries, key=lambda key: self._entries[key][1].measured_at)
            del self._entries[oldest]

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> None:
        """Read the file. A missing, oversize or corrupt file leaves the store empty (one warning)."""
        self.loaded = True
        try:
            if self.path.stat().st_size > CAPABILITY_FILE_MAX_BYTES:
                log.warning("ignoring %s: larger than %d bytes", self.path, CAPABILITY_FILE_MAX_BYTES)
                return
            data = read_json(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self.path, exc)
            return
        records = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(records, list):
            log.warning("ignoring %s: not a capability file", self.path)
            return
        bad = 0
        for record in records[:CAPABILITY_STORE_MAX_ENTRIES]:
            try:
                self.put(CapabilityScore.from_json(record), _size(record))
            except ValueError:
                bad += 1
        if bad:
            log.warning("ignored %d malformed entries in %s", bad, self.path)

    def dump(self) -> dict[str, Any]:
        entries = sorted(self._entries.values(), key=lambda e: (e[1].model_id, e[1].library_version))
        scores = [{**score.to_json(), "modelSizeBytes": size} for size, score in entries]
        return {"version": STORE_FORMAT_VERSION, "scores": scores}

    def save(self, snapshot: dict[str, Any] | None = None) -> None:
        """Write ``snapshot`` (a ``dump()`` taken on the event loop) or the current entries."""
        atomic_write_json(self.path, self.dump() if snapshot is None else snapshot)


def _size(record: Any) -> int:
    size = record.get("modelSizeBytes") if isinstance(record, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("modelSizeBytes must be a non-negative integer")
    return size
