"""A topic's fixed request `headers`: parsed, checked, stored and shown masked.

Taken as a JSON object `{"Authorization": "Bearer ..."}` or as text, one `Name: value` per
line. Stored in `dq_topic.headers` as a JSON object. Values are secrets: the console and
the API show every name with the value `***`, and a value sent back as `***` keeps the
stored one. Headers dq sets itself or that belong to the connection are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

Headers = tuple[tuple[str, str], ...]

MASK: Final = "***"
MAX_HEADERS: Final = 20
MAX_VALUE: Final = 1024
MAX_STORED: Final = 2048  # characters of the stored JSON (the column's width)
# Set by dq on every request (dq/roles/callback.py), or about the connection, not the request.
RESERVED: Final = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection",
    "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate", "te",
    "trailer", "upgrade", "expect", "user-agent"})
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_EXAMPLE: Final = 'e.g. {"Authorization": "Bearer abc123"} or the line Authorization: Bearer abc123'


class HeaderError(ValueError):
    """Headers that cannot be used; the text says which and why."""


def _pairs(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, list | tuple):
        if all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
            return [(str(k), v) for k, v in value]
        raise HeaderError(f"headers must be an object of name -> value, {_EXAMPLE}")
    if isinstance(value, str):
        out: list[tuple[str, Any]] = []
        for n, line in enumerate(value.splitlines(), 1):
            if not line.strip():
                continue
            name, colon, rest = line.partition(":")
            if not colon:
                raise HeaderError(f"headers line {n} has no ':'; write one Name: value per "
                                  "line, e.g. Authorization: Bearer abc123")
            out.append((name.strip(), rest.strip()))
        return out
    raise HeaderError(f"headers must be an object of name -> value, {_EXAMPLE}")


def parse(value: Any, keep: Headers = ()) -> Headers:
    """Headers from input (object, pairs or `Name: value` lines); a value `***` is the
    stored value of that name in `keep`. Raises HeaderError saying what is wrong."""
    stored = {k.lower(): v for k, v in keep}
    out: dict[str, tuple[str, str]] = {}
    for name, raw in _pairs(value if value is not None else ()):
        if not _TOKEN.fullmatch(name):
            raise HeaderError(f"header name {name[:64]!r} is not valid: use letters, digits "
                              "and - (e.g. Authorization, X-Api-Key), up to 64 characters")
        low = name.lower()
        if low in RESERVED or low.startswith(("x-dq-", "proxy-")):
            raise HeaderError(f"header {name} cannot be set: dq sets it, or it belongs to "
                              "the connection (refused: Host, Content-Length, Content-Type, "
                              "Transfer-Encoding, Connection, User-Agent, Proxy-*, X-Dq-* ...)")
        if low in out:
            raise HeaderError(f"header {name} is given twice; give each name once")
        if not isinstance(raw, str | int | float) or isinstance(raw, bool):
            raise HeaderError(f"header {name}'s value must be text")
        text = str(raw).strip()
        if text == MASK:
            if low not in stored:
                raise HeaderError(f"header {name} has the value {MASK}, the mask of a stored "
                                  "value, but none is stored: write its real value")
            text = stored[low]
        if len(text) > MAX_VALUE:
            raise HeaderError(f"header {name}'s value is {len(text)} characters long; the "
                              f"limit is {MAX_VALUE}")
        if not text.isascii():
            raise HeaderError(f"header {name}'s value must be ASCII; percent-encode or base64 "
                              "other text")
        if re.search(r"[\x00-\x1f\x7f]", text):
            raise HeaderError(f"header {name}'s value must not contain control characters "
                              "or line breaks")
        out[low] = (name, text)
    if len(out) > MAX_HEADERS:
        raise HeaderError(f"{len(out)} headers; at most {MAX_HEADERS}")
    headers = tuple(out.values())
    if len(dumps(headers)) > MAX_STORED:
        raise HeaderError(f"the headers together are too long; they may use {MAX_STORED} "
                          "characters")
    return headers


def dumps(headers: Headers) -> str:
    """As stored in the column: a JSON object, '' for none."""
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":")) if headers else ""


def loads(text: str) -> Headers:
    """As read from the column; text that is not a JSON object of strings gives none (a row
    written by hand), the rest is taken as it is."""
    if not text or not text.strip():
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        return ()
    if not isinstance(value, dict):
        return ()
    return tuple((str(k), v) for k, v in value.items()
                 if isinstance(v, str) and _TOKEN.fullmatch(str(k))
                 and str(k).lower() not in RESERVED and not str(k).lower().startswith("x-dq-"))


def masked(headers: Headers) -> dict[str, str]:
    """Every name with its value masked, for the API."""
    return {k: MASK for k, _ in headers}


def masked_text(headers: Headers) -> str:
    """Every name with its value masked, one `Name: ***` per line, for the console's form."""
    return "\n".join(f"{k}: {MASK}" for k, _ in headers)
