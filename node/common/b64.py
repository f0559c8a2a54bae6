"""base64url (RFC 4648 §5), the one codec for every wire value: keys, signatures, MACs, ids.

Encoding never pads. Decoding follows one strictness rule everywhere:

    the input is the canonical unpadded spelling of the bytes, optionally followed by exactly
    the ``=`` padding that completes it to a multiple of four characters.

Anything else (a character outside ``A-Z a-z 0-9 - _``, wrong or partial padding, a length
no byte string encodes to, or unused low bits that are not zero) raises ``ValueError``. So a
value has one spelling (plus its padded form), and what ``b64url_decode`` accepts,
``b64url_encode`` gives back unpadded. Python's own decoder silently skips foreign
characters; that is why nothing calls it directly.
"""

from __future__ import annotations

import base64
import binascii
import re

__all__ = ["b64url_decode", "b64url_encode"]

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """``data`` as unpadded base64url text."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """The bytes ``text`` spells under the rule in the module docstring, else ``ValueError``."""
    if not isinstance(text, str):
        raise ValueError("not base64url: expected a string")
    body = text.rstrip("=")
    padding = len(text) - len(body)
    if not _ALPHABET.fullmatch(body) or len(body) % 4 == 1:
        raise ValueError("not base64url")
    if padding and (padding > 2 or len(text) % 4):
        raise ValueError("not base64url: wrong padding")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if b64url_encode(raw) != body:
        raise ValueError("not canonical base64url")
    return raw
