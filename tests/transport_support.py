"""In-memory frame channels for multiplexer tests (aiortc's tests/utils.py does the same for
its transports): delivery on the next loop turns, a ``bufferedAmount`` that drains only
while the receiving side is not paused, and the low-water event."""

from __future__ import annotations

import asyncio
from collections import deque

from node.constants import LINK_SEND_LOW_WATER_BYTES
from node.transport.mux import StreamMux


class MemoryChannel:
    def __init__(self, low_water: int = LINK_SEND_LOW_WATER_BYTES) -> None:
        self.peer: MemoryChannel | None = None
        self.mux: StreamMux | None = None
        self.buffered_amount = 0
        self.low_water = low_water
        self.max_buffered = 0
        self.sent: list[bytes] = []
        self.closed = False
        self.paused = False
        self._queue: deque[bytes] = deque()

    def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("channel closed")
        self.sent.append(data)
        self.buffered_amount += len(data)
        self.max_buffered = max(self.max_buffered, self.buffered_amount)
        self._queue.append(data)
        asyncio.get_running_loop().call_soon(self._deliver)

    def resume(self) -> None:
        self.paused = False
        asyncio.get_running_loop().call_soon(self._deliver)

    def _deliver(self) -> None:
        while self._queue and not self.paused and not self.closed:
            data = self._queue.popleft()
            before = self.buffered_amount
            self.buffered_amount -= len(data)
            if self.peer is not None and self.peer.mux is not None and not self.peer.closed:
                self.peer.mux.feed(data)
            if before > self.low_water >= self.buffered_amount and self.mux is not None:
                self.mux.on_buffered_amount_low()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        peer = self.peer
        if peer is not None and peer.mux is not None:
            asyncio.get_running_loop().call_soon(peer.mux.close, "peer closed the channel")


def channel_pair() -> tuple[MemoryChannel, MemoryChannel]:
    a, b = MemoryChannel(), MemoryChannel()
    a.peer, b.peer = b, a
    return a, b
