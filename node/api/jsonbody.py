"""Reading and decoding a JSON request body with bounds, before any handler sees it.

``decode_json_body`` is the one JSON reader of every route (through
``read_json`` below). Besides syntax it refuses, as a 400 naming the problem:

- nesting deeper than ``JSON_MAX_DEPTH`` (a deep body would otherwise exhaust the
  interpreter's recursion limit in the decoder, or later in whatever walks it);
- a number literal longer than ``JSON_MAX_NUMBER_CHARS`` characters (Python refuses to convert
  integers of more than 4,300 digits, and a huge value overflows float conversions), or a
  float beyond the double range (``1e999``);
- ``NaN``, ``Infinity``, ``-Infinity`` (not JSON, though Python's decoder accepts them);
- text that cannot be encoded as UTF-8: a lone surrogate escape such as ``"\\ud800"`` is
  valid JSON syntax but no Unicode text, and would fail deep inside the engine, the audit
  log or a peer.

Pure: bytes in, a value or an ``InvalidRequestError`` out.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from ..common.errors import InvalidRequestError, PayloadTooLargeError
from ..constants import JSON_MAX_DEPTH, JSON_MAX_NUMBER_CHARS


def decode_json_body(raw: bytes) -> Any:
    """The body's JSON value, or ``InvalidRequestError`` (400) saying what is wrong with it."""
    try:
        value = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant)
    except RecursionError:
        raise _too_deep() from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    check_json_value(value)
    return value


def check_json_value(value: Any) -> None:
    """Refuse nesting deeper than ``JSON_MAX_DEPTH`` and text that is not valid Unicode.

    Iterative, so the check itself cannot run out of stack; only when a bad string is found is
    the value walked again to name its place.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not is_encodable(item):
                _check_text(item, _where_is_bad_text(value))
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > JSON_MAX_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            for key, child in item.items():
                if not is_encodable(key):
                    _check_text(key, _where_is_bad_text(value))
                if isinstance(child, (str, dict, list)):
                    stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in item if isinstance(child, (str, dict, list)))


def _where_is_bad_text(value: Any) -> str:
    """The path (``messages[0].content``) of the first string or key that is not valid Unicode."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str) and not is_encodable(item):
            return where
        if isinstance(item, dict):
            for key, child in item.items():
                if not is_encodable(key):
                    return where or "(a key)"
                stack.append((child, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
    return ""


def is_encodable(text: str) -> bool:
    """True when ``text`` is valid Unicode (no lone surrogates): it can be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str, where: str) -> None:
    if not is_encodable(text):
        place = f" (in {where[:200]})" if where else ""
        raise InvalidRequestError(
            f"the request body contains text that is not valid Unicode{place}: a lone surrogate "
            "escape such as \\ud800 is not a character", param=where[:200] or None, code="invalid_text")


def _parse_int(text: str) -> int:
    if len(text) > JSON_MAX_NUMBER_CHARS:
        raise _number_too_long()
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > JSON_MAX_NUMBER_CHARS:
        raise _number_too_long()
    value = float(text)
    if math.isinf(value):  # 1e999: valid JSON, but no float
        raise InvalidRequestError(f"the request body has a number out of range ({text[:40]})",
                                  code="number_too_long")
    return value


def _refuse_constant(name: str) -> Any:
    raise InvalidRequestError(f"the request body is not valid JSON: {name} is not a JSON value")


def _number_too_long() -> InvalidRequestError:
    return InvalidRequestError(f"the request body has a number longer than {JSON_MAX_NUMBER_CHARS} characters",
                               code="number_too_long")


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(f"the request body nests arrays/objects deeper than {JSON_MAX_DEPTH} levels",
                               code="json_too_deep")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, with a clear 400/413 when it is not."""
    limit = request.app._client_max_size  # noqa: SLF001 - aiohttp's own configured cap
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"request body is {request.content_length} bytes; the limit is {limit}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLargeError(f"request body is larger than the limit of {limit} bytes") from exc
    if not raw:
        raise InvalidRequestError("the request body is empty; expected a JSON object")
    return decode_json_body(raw)  # bounded depth and number size, valid Unicode text
