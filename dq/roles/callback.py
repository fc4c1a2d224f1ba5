"""The HTTP request a due job becomes, its signature, and how its reply is judged.

What a receiver sees
--------------------
- GET: the job's body fields are appended to the callback URL's query string
  (after any query the URL already has).
- POST with the topic's body_format 'form' (the default): the fields as an
  `application/x-www-form-urlencoded` body, as php-delayqueue sent them
  (DqCurl::add_post_field, http_build_query); the original's topics get it.
- POST with body_format 'json': the body object as `application/json` (UTF-8).
- POST with body_format 'query': the fields in the query string, as for GET, and an empty
  body. A GET topic always uses the query string; body_format only matters for POST.

Form and query fields are the body's top-level members, URL-encoded with `+` for spaces:
strings as they are, numbers in their JSON spelling, true as 1 and false and null as empty
values (`off=&none=`, as the original's DqCurl sent them: PHP's string of the value), and
nested arrays and objects as their compact JSON text (`items=[1,2]`), which receivers
decode with one json_decode (the original sent the word `Array`).

Headers on every request: `X-Dq-Topic` and `X-Dq-Id`, percent-encoded (`header_value`: the
text's UTF-8 bytes, every byte but A-Z a-z 0-9 - . _ ~ written %XX, so two ids never share
a header; `urllib.parse.unquote` or PHP's `rawurldecode` gives the text back), and
`X-Dq-Attempt`, the 1-based number of this delivery (a delivery cut off by its consumer's
death counts: see dq/roles/consumer/), so receivers can be idempotent. The topic's fixed
`headers` (dq/registry/headers.py, e.g. an Authorization the receiver expects) are sent too.
When the topic has a secret, also `X-Dq-Timestamp` (Unix seconds) and `X-Dq-Signature`:

    hex(HMAC-SHA256(key=secret as UTF-8, msg=timestamp + "." + signed bytes))

where the signed bytes are, for POST (form or json), the raw request body exactly as sent,
and for GET (or POST with body_format 'query') the request's whole query string exactly as
sent on the request line (the bytes after `?`, including any query that was already part
of the callback URL). Receivers should reject
stale timestamps (say, older than 5 minutes) to stop replays.

Success is a 2xx reply within the topic's timeout whose body is not empty (neither "" nor
"0", which the original took as no reply) and, when the body is a JSON object or array,
for which the topic's retry_when expression (if any) is false: as in the original, any
other non-empty reply (`ok`, HTML, a JSON string or number) is a success whatever
retry_when says. A 429 or 503 reply with a `Retry-After` header (seconds, or an HTTP date)
is a failure that carries the wait it asks for (`Outcome.retry_after`): the consumer waits
that long (at most `retry_after_max`) without counting an attempt. Redirects are not
followed: a 3xx is a failure, as with the original's curl. No
proxy is taken from the environment, and cookies a reply sets are not sent back.

A connection goes only to an address the callback network policy allows (dq/roles/netpolicy.py),
judged after DNS on every connection attempt; a refused one is a permanent failure: the
job becomes a dead letter at once, its error saying why.

Requests go out through one aiohttp session per consumer process (pooled keep-alive
connections, at most `concurrency` of them): httpx cost 1.4-2 ms of CPU per callback at 64
in flight, aiohttp about 0.1 ms (bench/http_clients.py, numbers in bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import aiohttp.abc
from aiohttp.abc import ResolveResult
from yarl import URL

from dq import __version__
from dq.registry.core import Topic
from dq.registry.retry_expr import Expr, RetryExprError, compile_retry_when, should_retry
from dq.roles.netpolicy import CallbackPolicy, CallbackRefused
from dq.storage.store import Claimed

log = logging.getLogger("dq.callback")

REPLY_CAP = 256 * 1024  # bytes of a reply read for retry_when; the rest is not read
EXCERPT = 500  # characters of a reply kept with a dead letter
USER_AGENT = f"dq/{__version__}"
# aiohttp rounds a timeout of 5 s or more up to a whole second of the loop clock; the
# topic's timeout is kept exactly by asyncio.timeout around the whole attempt instead.
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None)


@dataclass(frozen=True)
class Outcome:
    """What one callback attempt came to."""

    ok: bool
    status: int  # HTTP status, 0 when there was no reply
    error: str  # why it failed; '' on success
    reply: str  # the reply text (up to REPLY_CAP bytes, decoded)
    ms: int  # wall time of the attempt
    # no later attempt can succeed either (the callback network policy refused the
    # address): the job is buried at once instead of retried
    permanent: bool = False
    # seconds a 429 or 503 reply's Retry-After asked to wait (None: it asked nothing)
    retry_after: float | None = None


@dataclass(frozen=True)
class Request:
    """One signed callback attempt, ready to send exactly as it is."""

    method: str
    url: URL  # already encoded: sent byte for byte as built (and signed)
    headers: dict[str, str]
    body: bytes | None


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the callback network policy allows,
    so a connection is only tried to those (CallbackRefused when none is left)."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self.inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        allowed = [r for r in found if not self.policy.refusal(r["host"], r["port"])]
        if allowed or not found:
            return allowed
        why = "; ".join(dict.fromkeys(self.policy.refusal(r["host"], r["port"]) for r in found))
        raise CallbackRefused(f"{host} resolves to {why}")

    async def close(self) -> None:
        await self.inner.close()


def open_session(limit: int, policy: CallbackPolicy | None = None) -> aiohttp.ClientSession:
    """A consumer process's pooled HTTP session: at most `limit` connections, kept alive
    between callbacks, each only to an address `policy` allows (by default its default
    ranges only: consumers pass the one built from their settings, dq/roles/netpolicy.py). Create
    it inside the running loop; close it when done."""
    policy = policy or CallbackPolicy.default()
    connector = aiohttp.TCPConnector(limit=limit, resolver=GuardedResolver(policy),
                                     socket_factory=policy.refuse_socket)
    return aiohttp.ClientSession(
        connector=connector, timeout=_NO_TIMEOUT, trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False)


def _field(value: Any) -> str:
    # Plain ints and floats skip json.dumps: str(int) and repr(float) are its spelling.
    if isinstance(value, str):
        return value
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return repr(value) if math.isfinite(value) else str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch  # what quote_plus leaves as it is


# Field names and many values repeat from job to job (notify_time and dq_set_time are
# the same for every job of a second), and quote_plus is slow: keep recent answers.
@functools.lru_cache(maxsize=8192)
def _quote(text: str) -> str:
    return text if _PLAIN(text) else quote_plus(text)


def form_encode(body: dict[str, Any]) -> str:
    """The body's top-level members as application/x-www-form-urlencoded text (the same
    text urllib's urlencode makes, built without its per-item checks)."""
    return "&".join(f"{_quote(str(k))}={_quote(_field(v))}" for k, v in body.items())


def header_value(text: str) -> str:
    """`text` as an X-Dq-Id / X-Dq-Topic value: its UTF-8 bytes with every byte outside
    unreserved ASCII (A-Z a-z 0-9 - . _ ~) percent-encoded, `%` and spaces included, so
    distinct texts never share a header and urllib.parse.unquote gives the text back."""
    return text if _PLAIN(text) else quote(text, safe="", errors="surrogatepass")


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


@functools.lru_cache(maxsize=1024)
def _encoded(callback: str) -> URL:
    """The callback URL percent-encoded once (raises ValueError when it does not parse)."""
    return URL(str(URL(callback)), encoded=True)


def build_request(topic: Topic, c: Claimed, now: float) -> Request:
    """The signed request for one attempt of a claimed job, sent at `now` (epoch s).
    Raises ValueError when the topic's callback URL does not parse."""
    headers = {
        "User-Agent": USER_AGENT,
        "X-Dq-Topic": header_value(c.topic),
        "X-Dq-Id": header_value(c.id),
        "X-Dq-Attempt": str(c.attempt + 1),
    }
    for name, value in topic.headers:
        headers.setdefault(name, value)  # never one of the above: registry/headers.py refuses them
    body = c.body if isinstance(c.body, dict) else {"body": c.body}
    url = _encoded(topic.callback)
    content: bytes | None
    if topic.method == "GET" or topic.body_format == "query":
        # body_format 'query': a POST with the fields in the query string and an empty body
        url = URL(_with_query(str(url), form_encode(body)), encoded=True)
        content = None if topic.method == "GET" else b""
        signed = url.raw_query_string.encode("ascii")
    else:
        if topic.body_format == "json":
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        else:
            content = form_encode(body).encode("ascii")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        signed = content
    if topic.secret:
        ts = str(int(now))
        headers["X-Dq-Timestamp"] = ts
        headers["X-Dq-Signature"] = sign(topic.secret, ts, signed)
    return Request("GET" if topic.method == "GET" else "POST", url, headers, content)


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


EMPTY_REPLIES = ("", "0")  # what PHP's empty() calls empty: the original's "no reply"


RETRY_AFTER_STATUSES = (429, 503)


def retry_after(value: str | None, now: float) -> float | None:
    """The seconds a Retry-After header value asks to wait (delay-seconds, or an HTTP date
    in the future: 0 for one past), or None when it is absent or neither."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value[:12]))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" is read as naive: HTTP dates are GMT
        return None
    return max(0.0, when.timestamp() - now)


def judge(exprs: ExprCache, topic: Topic, status: int, reply: str, ms: int,
          wait: float | None = None) -> Outcome:
    """The outcome of a reply that arrived: a failure unless 2xx and non-empty, and then
    a failure only when the reply is a JSON object or array for which retry_when is true
    (the original's rule: any other non-empty reply is a success whatever the flag).
    `wait` is what the reply's Retry-After asked, kept for a 429 or 503."""
    if not 200 <= status < 300:
        if status in RETRY_AFTER_STATUSES and wait is not None:
            return Outcome(False, status, f"HTTP {status}, Retry-After {wait:.0f}s", reply, ms,
                           retry_after=wait)
        return Outcome(False, status, f"HTTP {status}", reply, ms)
    if reply in EMPTY_REPLIES:
        # The original (DqModule::send_http_request) took an empty reply, or "0", as no
        # reply at all: a failed notification, retried.
        return Outcome(False, status, f"empty reply {reply!r} (HTTP {status}): a receiver must "
                       "answer with a non-empty body, as php-delayqueue required", reply, ms)
    if should_retry(exprs.get(topic.retry_when), status, reply):
        return Outcome(False, status, f"retry_when matched: {topic.retry_when}", reply, ms)
    return Outcome(True, status, "", reply, ms)


async def send(session: aiohttp.ClientSession, req: Request,
               cap: int = REPLY_CAP) -> tuple[int, str, str | None]:
    """Send `req` without following redirects; its status, reply text (at most `cap`
    bytes are read; a reply cut short closes its connection instead of reusing it) and
    Retry-After header (None without one)."""
    async with session.request(req.method, req.url, headers=req.headers, data=req.body,
                               allow_redirects=False) as resp:
        chunks: list[bytes] = []
        size = 0
        while size < cap and (chunk := await resp.content.read(cap - size)):
            chunks.append(chunk)
            size += len(chunk)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        after = resp.headers.get("Retry-After")
        try:
            return resp.status, raw.decode(resp.charset or "utf-8", errors="replace"), after
        except LookupError:  # a charset Python does not know
            return resp.status, raw.decode("utf-8", errors="replace"), after


async def call(session: aiohttp.ClientSession, exprs: ExprCache, topic: Topic, c: Claimed,
               timeout: float) -> Outcome:
    """One attempt of a claimed job: build, sign and send its request, judge the reply.
    Expected failures (bad URL, refused, reset, timed out) come back as an Outcome."""
    t0 = time.monotonic()

    def ms() -> int:
        return int((time.monotonic() - t0) * 1000)

    try:
        req = build_request(topic, c, time.time())
    except ValueError as exc:
        return Outcome(False, 0, f"invalid callback URL {topic.callback!r}: {exc}", "", ms())
    try:
        async with asyncio.timeout(timeout):
            status, reply, after = await send(session, req)
    except TimeoutError:
        return Outcome(False, 0, f"timed out after {int(timeout * 1000)} ms", "", ms())
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, CallbackRefused):
            return Outcome(False, 0, f"refused by the callback network policy: {exc.os_error}; "
                           "not retried: change the topic's callback (or callback_allow), "
                           "then redrive the job", "", ms(), permanent=True)
        return Outcome(False, 0, f"{exc.__class__.__name__}: {exc}", "", ms())
    except aiohttp.ClientError as exc:
        return Outcome(False, 0, f"{exc.__class__.__name__}: {exc}", "", ms())
    wait = retry_after(after, time.time()) if status in RETRY_AFTER_STATUSES else None
    return judge(exprs, topic, status, reply, ms(), wait)
