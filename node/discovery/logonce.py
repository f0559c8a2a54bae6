"""Log a repeated problem from one source once as a warning, then at debug level."""

from __future__ import annotations

import logging
from collections import OrderedDict

from ..constants import MAX_WARNING_KEYS


class WarnOnce:
    """``warn(key, ...)`` logs at WARNING the first time ``key`` is seen, at DEBUG after.

    Keys are (source, problem) pairs chosen by the caller. At most ``max_keys`` are
    remembered (oldest forgotten first), so a flood of sources cannot grow memory.
    """

    def __init__(self, logger: logging.Logger, *, max_keys: int = MAX_WARNING_KEYS) -> None:
        self._logger = logger
        self._max_keys = max_keys
        self._seen: OrderedDict[tuple[str, ...], None] = OrderedDict()

    def warn(self, key: tuple[str, ...], message: str, *args: object) -> bool:
        """Log ``message``; True when it went out as a warning."""
        if key in self._seen:
            self._seen.move_to_end(key)
            self._logger.debug(message, *args)
            return False
        self._seen[key] = None
        if len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        self._logger.warning(message, *args)
        return True

    def __len__(self) -> int:
        return len(self._seen)
