"""Time-limited TURN credentials in coturn's REST scheme (``use-auth-secret``).

The rendezvous and coturn share a secret. A device that proved its id on the presence
WebSocket may ask for credentials; they expire after ``turn_ttl`` seconds and name the
device, so the operator's TURN server relays only for devices its rendezvous knows::

    username   = "<unix expiry>:<device id>"
    credential = base64(HMAC-SHA1(secret, username))

(the scheme of draft-uberti-behave-turn-rest, as coturn implements it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

__all__ = ["TurnCredentials", "mint_turn_credentials"]


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    urls: tuple[str, ...]
    username: str
    credential: str
    ttl: int

    def to_frame(self) -> dict[str, object]:
        return {"type": "turn", "urls": list(self.urls), "username": self.username,
                "credential": self.credential, "ttl": self.ttl}


def mint_turn_credentials(secret: str, urls: tuple[str, ...], device_id: str, now: float,
                          ttl: float) -> TurnCredentials:
    username = f"{int(now + ttl)}:{device_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return TurnCredentials(urls, username, base64.b64encode(digest).decode(), int(ttl))
