"""A malicious rendezvous for tests: the real service, but its relay tampers with the sealed
signaling messages it forwards. ``DVAI_TAMPER=flip`` changes one character of every sealed
message (as if it rewrote the SDP inside); ``DVAI_TAMPER=replay`` delivers, for each pair of
devices, the first message it ever relayed in place of every later one. With
``DVAI_TAMPER_FILE`` set, the mode is read from that file at every message instead (a
test switches modes without restarting the service; an empty file relays faithfully).

    DVAI_TAMPER=flip python -m tests.tampering_rendezvous --host 127.0.0.1 --port N --db :memory:
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rendezvous import signaling

_original = signaling.SignalingHub._relay  # noqa: SLF001 - this is a test double of the relay
_first: dict[tuple[str, object], str] = {}


def _mode() -> str:
    path = os.environ.get("DVAI_TAMPER_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                return file.read().strip()
        except OSError:
            return ""
    return os.environ.get("DVAI_TAMPER", "")


async def _tampered(self: signaling.SignalingHub, connection: Any, frame: dict[str, Any]) -> None:
    data = frame.get("data")
    mode = _mode()
    if isinstance(data, str) and data.startswith("s1.") and len(data) > 40:
        if mode == "flip":
            middle = len(data) // 2
            frame = {**frame, "data": data[:middle] + ("A" if data[middle] != "A" else "B") + data[middle + 1:]}
        elif mode == "replay":
            key = (connection.device_id, frame.get("to"))
            frame = {**frame, "data": _first.setdefault(key, data)}
    await _original(self, connection, frame)


signaling.SignalingHub._relay = _tampered  # type: ignore[method-assign]  # noqa: SLF001

if __name__ == "__main__":
    from rendezvous.cli import main

    sys.exit(main())
