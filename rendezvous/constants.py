"""The rendezvous's own caps on hostile input, each with its unit and the reason it exists.

They live here, not in ``node/constants.py``: the rendezvous imports nothing of the node but
``node.common`` and ``node.version`` (its image installs only a few of the node's
dependencies), and no node code needs these numbers. The operator-tunable limits (session
counts, body and message sizes, rates) are settings in ``rendezvous/config.py``.
"""

from __future__ import annotations

MAX_ABORT_REASON = 200
"""characters of a client-given abort reason kept and relayed."""

MAX_PRESENCE_QUERY = 64
"""device ids one presence query may ask about; bounds the reply."""

MAX_MESSAGE_ID = 64
"""characters of a client's optional message id echoed in errors."""

MAX_HELLO_FIELD_CHARS = 200
"""characters of the base64url ``public_key`` / ``signature`` in a WebSocket ``hello`` (a real
one is 43 / 86); longer ones are refused before they are decoded."""

MAX_CLIENT_ADDRESS_CHARS = 64
"""characters of a client address taken from X-Forwarded-For (an IPv6 address is at most 45);
it keys a rate-limit bucket, so a longer value must not cost more memory."""
