"""The HTTP request a due job becomes, its signature, and how its reply is judged.

What a receiver sees
--------------------
- GET: the job's body fields are appended to the callback URL's query string
  (after any query the URL already has).
- POST with the topic's body_format 'form' (the default): the fields as an
  `application/x-www-form-urlencoded` body.
- POST with body_format 'json': the body object as `application/json` (UTF-8). A GET topic
  always uses the query string; body_format only matters for POST.

Form and query fields are the body's top-level members, URL-encoded with `+` for spaces:
strings as they are, numbers in their JSON spelling, true/false as 1/0 (PHP's
http_build_query does the same), null members are left out, and nested arrays and objects
as their compact JSON text (`items=[1,2]`), which receivers decode with one json_decode
instead of PHP's `items[0]=1&items[1]=2` brackets.

Headers on every request: `X-Dq-Topic`, `X-Dq-Id` (percent-encoded when not printable
ASCII) and `X-Dq-Attempt`, the 1-based attempt number, so receivers can be idempotent.
When the topic has a secret, also `X-Dq-Timestamp` (Unix seconds) and `X-Dq-Signature`:

    hex(HMAC-SHA256(key=secret as UTF-8, msg=timestamp + "." + signed bytes))

where the signed bytes are, for POST, the raw request body exactly as sent, and for GET the
request's whole query string exactly as sent on the request line (the bytes after `?`,
including any query that was already part of the callback URL). Receivers should reject
stale timestamps (say, older than 5 minutes) to stop replays.

Success is a 2xx reply within the topic's timeout whose retry_when expression (if any) is
false. Redirects are not followed: a 3xx is a failure, as with the original's curl.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from dq.registry import Topic
from dq.retry_expr import Expr, RetryExprError, compile_retry_when, should_retry
from dq.store import Claimed

log = logging.getLogger(__name__)

REPLY_CAP = 256 * 1024  # bytes of a reply read for retry_when; the rest is not read
EXCERPT = 500  # characters of a reply kept with a dead letter
USER_AGENT = "dq/0.1"


@dataclass(frozen=True)
class Outcome:
    """What one callback attempt came to."""

    ok: bool
    status: int  # HTTP status, 0 when there was no reply
    error: str  # why it failed; '' on success
    reply: str  # the reply text (up to REPLY_CAP bytes, decoded)
    ms: int  # wall time of the attempt


def _field(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def form_encode(body: dict[str, Any]) -> str:
    """The body's top-level members as application/x-www-form-urlencoded text."""
    pairs = [(str(k), v) for k, v in ((k, _field(v)) for k, v in body.items()) if v is not None]
    return urlencode(pairs)


def _header_value(text: str) -> str:
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


def sign(secret: str, timestamp: str, data: bytes) -> str:
    """The X-Dq-Signature of `data` sent at `timestamp`."""
    msg = timestamp.encode() + b"." + data
    return hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def _with_query(url: str, query: str) -> str:
    base, hash_, fragment = url.partition("#")
    if query:
        if "?" not in base:
            base += "?"
        elif not base.endswith(("?", "&")):
            base += "&"
        base += query
    return base + hash_ + fragment


def build_request(client: httpx.AsyncClient, topic: Topic, c: Claimed, now: float, *,
                  timeout: float) -> httpx.Request:
    """The signed request for one attempt of a claimed job, sent at `now` (epoch s)."""
    headers = {
        "User-Agent": USER_AGENT,
        "X-Dq-Topic": _header_value(c.topic),
        "X-Dq-Id": _header_value(c.id),
        "X-Dq-Attempt": str(c.attempt + 1),
    }
    body = c.body if isinstance(c.body, dict) else {"body": c.body}
    if topic.method == "GET":
        req = client.build_request("GET", _with_query(topic.callback, form_encode(body)),
                                   headers=headers, timeout=timeout)
        signed = req.url.query
    else:
        if topic.body_format == "json":
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        else:
            content = form_encode(body).encode("ascii")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        req = client.build_request("POST", topic.callback, content=content, headers=headers,
                                   timeout=timeout)
        signed = content
    if topic.secret:
        ts = str(int(now))
        req.headers["X-Dq-Timestamp"] = ts
        req.headers["X-Dq-Signature"] = sign(topic.secret, ts, signed)
    return req


class ExprCache:
    """Compiled retry_when expressions, by their text (so once per topic version)."""

    def __init__(self, limit: int = 1024) -> None:
        self._compiled: dict[str, Expr | None] = {}
        self._limit = limit

    def get(self, text: str) -> Expr | None:
        try:
            return self._compiled[text]
        except KeyError:
            pass
        try:
            expr = compile_retry_when(text)
        except RetryExprError as exc:
            # A stored expression that does not parse cannot decide anything: judge by status.
            log.warning("retry_when %r does not parse (%s); replies are judged by their "
                        "status only", text, exc.message)
            expr = None
        if len(self._compiled) >= self._limit:
            self._compiled.clear()
        self._compiled[text] = expr
        return expr


def judge(exprs: ExprCache, topic: Topic, status: int, reply: str, ms: int) -> Outcome:
    """The outcome of a reply that arrived."""
    if not 200 <= status < 300:
        return Outcome(False, status, f"HTTP {status}", reply, ms)
    if should_retry(exprs.get(topic.retry_when), status, reply):
        return Outcome(False, status, f"retry_when matched: {topic.retry_when}", reply, ms)
    return Outcome(True, status, "", reply, ms)


async def read_reply(resp: httpx.Response, cap: int = REPLY_CAP) -> str:
    """The reply text, reading at most `cap` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= cap:
            break
    raw = b"".join(chunks)[:cap]
    try:
        return raw.decode(resp.encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return raw.decode("utf-8", errors="replace")
