"""One callback attempt (dq.roles.callback.call) against the real test receiver: what is sent,
what counts as a failure, and the limits on the reply and on time."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.metadata
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest

import dq
from dq.registry.core import Topic
from dq.roles.callback import (
    REPLY_CAP,
    ExprCache,
    call,
    form_encode,
    header_value,
    open_session,
    sign,
)
from dq.storage.store import Claimed
from tests.support.procs import free_port
from tests.support.receiver import Receiver, Reply, Request


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with open_session(8) as s:
        yield s


def job(job_id: str = "1", body: dict[str, Any] | None = None) -> Claimed:
    return Claimed(shard=None, tid=f"t:{job_id}", topic="t", id=job_id,  # type: ignore[arg-type]
                   version="v", priority=2, attempt=0, due_ms=0, set_ms=0,
                   body=body if body is not None else {"a": 1}, claimed_ms=0)


def topic(url: str, **kw: Any) -> Topic:
    return Topic(topic="t", name="t", callback=url, method=kw.pop("method", "POST"), **kw)


def test_form_encode_spells_like_urlencode() -> None:
    body = {"s": "a b&c=d/中", "i": -12, "f": 0.1, "big": 10**20, "inf": float("inf"),
            "t": True, "off": False, "n": None, "l": [1, "x"], "plain": "Az09_.~-"}
    # true/false/null as the original's DqCurl sent them: PHP's string of each ("1", "")
    assert form_encode(body) == ("s=a+b%26c%3Dd%2F%E4%B8%AD&i=-12&f=0.1&big=100000000000000000000"
                                 "&inf=inf&t=1&off=&n=&l=%5B1%2C%22x%22%5D&plain=Az09_.~-")


def test_header_value_is_injective_and_unquote_reverses_it() -> None:
    """X-Dq-Id: distinct ids never share a header, and urllib's unquote (PHP's
    rawurldecode) gives each id back: every byte but unreserved ASCII is %XX."""
    rng = random.Random(17)
    alphabet = "aZ09-._~ %+:|/?#&=\"'\\é✓😀中\u00a0\u2028"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(20000)}
    ids |= {"é✓😀", "%C3%A9%E2%9C%93%F0%9F%98%80", " lead", "lead", "%", "%25"}
    headers = {header_value(i): i for i in ids}
    assert len(headers) == len(ids)
    assert all(unquote(h, errors="strict") == i for h, i in headers.items())
    assert all(h.isascii() and " " not in h for h in headers)
    assert header_value("Az09-._~") == "Az09-._~" and header_value("%") == "%25"


async def test_post_with_query_format_sends_the_fields_in_the_url(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    """body_format 'query': a POST with the fields in the query string and an empty body,
    signed over that query string."""
    t = topic(receiver.url("/q?src=dq"), body_format="query", secret="k")
    out = await call(session, ExprCache(), t, job("7", {"order_id": 42, "off": False}), 2.0)
    assert out.ok
    [req] = receiver.requests
    assert req.method == "POST" and req.body == b""
    assert req.query.startswith(b"src=dq&order_id=42&off=")
    ts = req.headers["x-dq-timestamp"]
    assert req.headers["x-dq-signature"] == sign("k", ts, req.query)


async def test_redirect_is_a_failure_and_not_followed(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.routes["/moved"] = lambda req: (302, b"")
    out = await call(session, ExprCache(), topic(receiver.url("/moved")), job(), 2.0)
    assert not out.ok and out.status == 302 and out.error == "HTTP 302"
    assert len(receiver.requests) == 1


async def test_reply_is_read_up_to_the_cap_and_the_next_call_still_works(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.routes["/big"] = lambda req: (200, b"x" * (REPLY_CAP + 100_000))
    out = await call(session, ExprCache(), topic(receiver.url("/big")), job(), 5.0)
    assert out.ok and len(out.reply) == REPLY_CAP
    out = await call(session, ExprCache(), topic(receiver.url("/small")), job("2"), 5.0)
    assert out.ok and out.reply == '{"code":0}'


async def test_timeout_is_the_whole_attempt(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    async def hang(req: Request) -> Reply:
        await asyncio.sleep(10)
        return 200, b""
    receiver.routes["/hang"] = hang
    out = await call(session, ExprCache(), topic(receiver.url("/hang")), job(), 0.3)
    assert not out.ok and out.status == 0 and out.error == "timed out after 300 ms"
    assert 250 <= out.ms < 5000  # given up at the timeout, not after the receiver's 10 s


async def test_refused_and_unparsable_urls_are_failed_attempts(
        session: aiohttp.ClientSession) -> None:
    out = await call(session, ExprCache(), topic(f"http://127.0.0.1:{free_port()}/"), job(), 2.0)
    assert not out.ok and out.status == 0 and "ClientConnectorError" in out.error
    for url in ("http://[::1/", "not a url", "ftp://127.0.0.1/"):
        out = await call(session, ExprCache(), topic(url), job(), 2.0)
        assert not out.ok and out.status == 0 and out.error, url


async def test_proxy_settings_in_the_environment_are_ignored(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with open_session(2) as session:
        out = await call(session, ExprCache(), topic(receiver.url("/p")), job(), 2.0)
    assert out.ok and len(receiver.requests) == 1


async def test_get_signs_exactly_the_query_it_sends(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    url = receiver.url("/g/路 径?x=a b&y=%41")
    t = topic(url, method="GET", secret="k")
    out = await call(session, ExprCache(), t, job("订单 1", {"q": "1 2", "z": "中"}), 2.0)
    assert out.ok
    [req] = receiver.requests
    assert req.headers["x-dq-id"] == "%E8%AE%A2%E5%8D%95%201"
    assert req.fields()["q"] == "1 2" and req.fields()["z"] == "中"
    assert req.fields()["x"] == "a b" and req.fields()["y"] == "A"
    ts = req.headers["x-dq-timestamp"]
    want = hmac.new(b"k", ts.encode() + b"." + req.query, hashlib.sha256).hexdigest()
    assert req.headers["x-dq-signature"] == want


# The original's rule for a reply, as facts from php-delayqueue's DqModule.php:
# send_http_request() returns the reply body; notify() counts empty($response) (the
# empty string or "0") as no reply, a failure retried later; otherwise, when the topic's
# re_notify_flag is not empty and json_decode($response, true) is an array (a JSON object
# or list), the flag is evaluated and true means retry; any other reply is a success.
# Each row: reply body, whether PHP's json_decode makes it an array, and the flag's value
# for each flag below when it is evaluated (None when it is not).
FLAGS = ("", "{res.code}!=0", "{res.code}!=200 && {res.data.status}!=2 || {res.data.msg}=='failed'",
         "true")
REPLIES: list[tuple[bytes, bool, tuple[bool | None, ...]]] = [
    (b"ok", False, (None, None, None, None)),
    (b"OK\n", False, (None, None, None, None)),
    (b"success", False, (None, None, None, None)),
    (b"<html><body>done</body></html>", False, (None, None, None, None)),
    (b'"ok"', False, (None, None, None, None)),
    (b"1", False, (None, None, None, None)),
    (b"200", False, (None, None, None, None)),
    (b"true", False, (None, None, None, None)),
    (b"null", False, (None, None, None, None)),
    (b" ", False, (None, None, None, None)),
    (b"{code:0}", False, (None, None, None, None)),  # not JSON: keys unquoted
    (b'{"code":0}', True, (None, False, True, True)),
    (b'{"code":1}', True, (None, True, True, True)),
    (b'{"code":"0"}', True, (None, False, True, True)),
    (b'{"code":200,"data":{"status":1}}', True, (None, True, False, True)),
    (b'{"code":500,"data":{"status":2}}', True, (None, True, False, True)),
    (b'{"code":200,"data":{"status":2,"msg":"failed"}}', True, (None, True, True, True)),
    (b' {"code":1} ', True, (None, True, True, True)),
    (b"[1,2]", True, (None, None, None, True)),
    (b"", False, (None, None, None, None)),
    (b"0", False, (None, None, None, None)),
]


def original_retries(reply: bytes, is_array: bool, flag: str, value: bool | None) -> bool:
    if reply in (b"", b"0"):  # PHP's empty()
        return True
    if flag.strip() and is_array:
        assert value is not None
        return value
    return False


async def test_replies_are_judged_as_the_original_judged_them(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.default = lambda req: (200, REPLIES[int(req.job_id.split("-")[1])][0])
    exprs = ExprCache()
    decided = 0
    for f, flag in enumerate(FLAGS):
        for r, (reply, is_array, values) in enumerate(REPLIES):
            if values[f] is None and is_array and flag.strip():
                continue  # a pair the table leaves to test_retry_expr (PHP's null compares)
            out = await call(session, exprs, topic(receiver.url("/"), retry_when=flag),
                             job(f"{f}-{r}"), 5.0)
            want = original_retries(reply, is_array, flag, values[f])
            assert out.ok is not want, (flag, reply, out)
            assert out.status == 200 and out.reply == reply.decode()
            if reply in (b"", b"0"):
                assert "empty reply" in out.error
            decided += 1
    assert decided >= 80
    assert len(receiver.requests) == decided


async def test_a_non_2xx_reply_fails_whatever_its_body(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    # dq departs from the original on purpose here: it took any non-empty reply, even an
    # HTTP 500 page, as a success.
    receiver.routes["/500"] = lambda req: (500, b"ok")
    out = await call(session, ExprCache(), topic(receiver.url("/500")), job(), 2.0)
    assert not out.ok and out.error == "HTTP 500"


async def test_user_agent_carries_the_package_version(
        receiver: Receiver, session: aiohttp.ClientSession) -> None:
    out = await call(session, ExprCache(), topic(receiver.url("/ua")), job(), 2.0)
    assert out.ok
    [req] = receiver.requests
    assert req.headers["user-agent"] == f"dq/{dq.__version__}"
    assert dq.__version__ == importlib.metadata.version("dq")
