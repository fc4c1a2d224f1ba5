"""The console against hostile clients: password guessing, deeply nested JSON, and
connections that never finish their request (issue 17, points 3, 4 and 9).

Guessing and slow connections run against a real console (web.app.run: uvicorn on a free
port); guessers come from distinct loopback addresses (127.0.0.x) so that per-address
limits can be told from the overall one.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import web.protocol
import web.throttle
from dq.config import Settings
from tests.support.browser import LiveConsole
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.web import GOOD_TOPIC, PW, Web, open_web

BASE = "http://127.0.0.1"
LIMITS = web.throttle.Limits()  # what a console runs with


# -- deep JSON -----------------------------------------------------------------------------

@pytest.fixture
async def api(redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[Web]:
    async with open_web(redis_server.url, f"sqlite:///{tmp_path / 'dq.sqlite3'}") as w:
        yield w


def nested(depth: int, kind: str) -> str:
    return ('{"a":' * depth + "1" + "}" * depth) if kind == "object" else \
        ("[" * depth + "]" * depth)


@pytest.mark.parametrize(("method", "path", "field"), [
    ("POST", "/api/jobs", "body"), ("POST", "/api/topics", "name"),
    ("PUT", "/api/topics/order_timeout", "name"), ("POST", "/api/shards", "name"),
    ("PUT", "/api/alert", "host"), ("POST", "/api/alert/test", "to")])
async def test_deeply_nested_json_is_refused_with_422(api: Web, method: str, path: str,
                                                      field: str) -> None:
    """JSON nested 1,000 levels or more used to raise RecursionError (500); nested past
    dq's limit of 100 (as the TCP server refuses it) it is a 422 saying so."""
    r = await api.api.post("/api/topics", json=GOOD_TOPIC)
    assert r.status_code == 201, r.text
    for depth in (101, 999, 1000, 5000, 40_000):  # 40,000: under the 256 KiB cap
        for kind in ("object", "array"):
            value = nested(depth - 1, kind)
            text = f'{{"topic": "order_timeout", "id": "j1", "{field}": {value}}}'
            r = await api.api.request(method, path, content=text,
                                      headers={"content-type": "application/json"})
            assert r.status_code == 422, f"{depth} {kind}: {r.status_code} {r.text[:200]}"
            assert r.json()["err"] == "invalid" and "nested more than 100" in r.json()["detail"]
    # the console is unharmed, and a body at the limit is taken
    assert (await api.api.get("/api/topics")).status_code == 200
    if path == "/api/jobs":
        r = await api.api.post(path, content='{"topic": "order_timeout", "id": "j2", "body": '
                               + nested(98, "object") + "}",
                               headers={"content-type": "application/json"})
        assert r.status_code == 201, r.text


# -- password guessing ---------------------------------------------------------------------

@pytest.fixture
def live(redis_server: RedisProcess, tmp_path: Path) -> Iterator[LiveConsole]:
    settings = Settings(redis=(redis_server.url,), web_port=free_port(), web_host="127.0.0.1",
                        web_password=PW, db=f"sqlite:///{tmp_path / 'dq.sqlite3'}")
    with LiveConsole(settings) as console:
        yield console


TLS = ssl.create_default_context()  # unused (http), but made once: each costs ~70 ms


def client_from(live: LiveConsole, address: str, **kw: Any) -> httpx.AsyncClient:
    """An HTTP client whose connections come from `address` (any 127.x.y.z is loopback)."""
    return httpx.AsyncClient(base_url=live.url, timeout=60, **kw, transport=httpx.
                             AsyncHTTPTransport(local_address=address, verify=TLS))


async def form_guess(client: httpx.AsyncClient, password: str) -> httpx.Response:
    page = await client.get("/login")
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return await client.post("/login", data={"csrf": match.group(1), "password": password,
                                             "next": "/"})


async def guess(client: httpx.AsyncClient, n: int, password: str = "guess") -> httpx.Response:
    """One guess, by Basic, Bearer or the login form in turn."""
    if n % 3 == 0:
        return await client.get("/api/topics", auth=("admin", password))
    if n % 3 == 1:
        return await client.get("/api/topics", headers={"Authorization": f"Bearer {password}"})
    return await form_guess(client, password)


async def hammer(live: LiveConsole, addresses: list[str], per_address: int,
                 seconds: float, during: Callable[[], Awaitable[None]] | None = None
                 ) -> tuple[Counter[tuple[str, int]], float, list[str]]:
    """`per_address` concurrent guessers from each address for `seconds`: how many answers
    of each status each address got, the time it took, and Retry-After values seen."""
    statuses: Counter[tuple[str, int]] = Counter()
    retry: list[str] = []

    async def guesser(client: httpx.AsyncClient, address: str, k: int) -> None:
        n = k
        while time.monotonic() < stop:
            r = await guess(client, n)
            statuses[address, r.status_code] += 1
            if r.status_code == 429:
                retry.append(r.headers.get("retry-after", ""))
            n += 1

    # a client (a cookie jar) per guesser: form guessers sharing one would spoil each
    # other's CSRF tokens
    clients = [(a, client_from(live, a)) for a in addresses for _ in range(per_address)]
    start = time.monotonic()
    stop = start + seconds
    try:
        tasks = [asyncio.create_task(guesser(c, a, k)) for k, (a, c) in enumerate(clients)]
        if during is not None:
            await asyncio.sleep(seconds / 2)
            await during()
        await asyncio.gather(*tasks)
    finally:
        for _, c in clients:
            await c.aclose()
    return statuses, time.monotonic() - start, retry


def judged(statuses: Counter[tuple[str, int]], address: str | None = None) -> int:
    """Guesses whose password was looked at: answered 401 (the form's too), not 429."""
    return sum(n for (a, code), n in statuses.items()
               if code == 401 and address in (None, a))


@pytest.mark.login_throttle
async def test_a_wrong_password_waits_before_its_answer(live: LiveConsole) -> None:
    """The wait the limits come on top of: a wrong password, by each way in, is answered
    no sooner than LIMITS.wait (0.3 s); the right one is let in."""
    async with client_from(live, "127.0.0.5") as client:
        for n in range(3):
            t0 = time.monotonic()
            r = await guess(client, n)
            took = time.monotonic() - t0
            assert r.status_code == 401 and took >= LIMITS.wait, (n, r.status_code, took)
        assert (await guess(client, 0, PW)).status_code == 200
        assert (await form_guess(client, PW)).status_code == 303


@pytest.mark.login_throttle
async def test_guessing_from_one_address_is_limited_to_that_address(
        live: LiveConsole) -> None:
    """64 concurrent guessers from one address (Basic, Bearer and the form) get at most
    the per-address burst and rate judged; the rest get 429 with Retry-After. The owner
    from another address (never seen before) gets in meanwhile; from the guessers' own
    address even the right password gets the same 429: a limited answer tells nothing."""
    seen: dict[str, int] = {}

    async def owner() -> None:
        async with client_from(live, "127.0.0.3") as me:
            seen["api"] = (await me.get("/api/topics", auth=("admin", PW))).status_code
            seen["form"] = (await form_guess(me, PW)).status_code
        async with client_from(live, "127.0.0.2") as same:
            for _ in range(20):  # a token freed meanwhile may let one in: that is fair
                right = await same.get("/api/topics", auth=("admin", PW))
                if right.status_code == 429:
                    break
            seen["same address"] = right.status_code
            wrong = await same.get("/api/topics", auth=("admin", "nope"))
            if wrong.status_code == 429:
                assert right.json() == wrong.json() and right.headers["retry-after"]

    statuses, took, retry = await hammer(live, ["127.0.0.2"], 64, 4.0, owner)
    bound = LIMITS.address_burst + LIMITS.per_address * took + 1
    print(f"\n64 guessers, one address, {took:.1f} s: {dict(statuses)}; judged "
          f"{judged(statuses)} (bound {bound:.0f})", flush=True)
    assert judged(statuses) <= bound
    assert statuses["127.0.0.2", 429] > 0 and all(v.isdigit() and int(v) >= 1 for v in retry)
    assert seen == {"api": 200, "form": 303, "same address": 429}


@pytest.mark.login_throttle
async def test_guessing_from_many_addresses_is_limited_overall_but_not_for_the_owner(
        live: LiveConsole) -> None:
    """Ten addresses guessing at once get at most the overall burst and rate judged in all
    (each under its own limit too). An address that got in before the flood, and a browser
    that logged in before it, still get in during it."""
    async with client_from(live, "127.0.0.99") as me:
        assert (await me.get("/api/topics", auth=("admin", PW))).status_code == 200
        assert (await form_guess(me, PW)).status_code == 303
        session = dict(me.cookies)
    seen: list[int] = []

    async def owner() -> None:
        async with client_from(live, "127.0.0.99") as api, \
                client_from(live, "127.0.0.98", cookies=session) as browser:
            for _ in range(3):
                seen.append((await api.get("/api/topics", auth=("admin", PW))).status_code)
                seen.append((await api.get("/api/topics",
                                           headers={"Authorization": f"Bearer {PW}"})).status_code)
                seen.append((await browser.get("/topics")).status_code)

    addresses = [f"127.0.0.{i}" for i in range(10, 20)]
    statuses, took, retry = await hammer(live, addresses, 6, 4.0, owner)
    bound = LIMITS.overall_burst + LIMITS.overall * took + 1
    print(f"\n60 guessers, 10 addresses, {took:.1f} s: judged {judged(statuses)} (bound "
          f"{bound:.0f}), refused {sum(n for (_, c), n in statuses.items() if c == 429)}",
          flush=True)
    assert judged(statuses) <= bound
    for a in addresses:
        assert judged(statuses, a) <= LIMITS.address_burst + LIMITS.per_address * took + 1
    assert retry and all(v.isdigit() and int(v) >= 1 for v in retry)
    assert seen == [200] * len(seen) and seen


# -- connections that never finish their request -------------------------------------------

@pytest.fixture
def quick_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter deadlines than a console's (10 s head, 30 s body) so the test is quick."""
    monkeypatch.setattr(web.protocol, "HEAD_TIMEOUT", 2.0)
    monkeypatch.setattr(web.protocol, "BODY_TIMEOUT", 2.0)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it was still open after `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""


async def test_half_sent_requests_are_closed_and_the_console_still_answers(
        live: LiveConsole, quick_deadlines: None) -> None:
    """500 connections that send half a request head (some trickling a byte at a time)
    are closed within the head deadline (408), a half-sent body within the body deadline,
    and a normal request is answered meanwhile."""
    port = int(live.url.rsplit(":", 1)[1])
    conns = []
    for _ in range(500):  # opening them may outlast the deadline on a loaded machine
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        conns.append((reader, writer))
    body_r, body_w = await asyncio.open_connection("127.0.0.1", port)
    body_w.write(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/"
                 b"x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\npassword=")
    opened = time.monotonic()

    async def trickle() -> None:  # bytes keep coming, but the head never ends
        for _ in range(30):
            for _, w in conns[:20]:
                if not w.is_closing():
                    w.write(b"x")
            await asyncio.sleep(0.25)

    trickler = asyncio.create_task(trickle())
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        r = await client.get("/healthz")
    assert r.status_code == 200
    bound = web.protocol.HEAD_TIMEOUT + 20  # far from normal: a loaded machine is slow
    results = await asyncio.gather(*(closed_within(r, bound) for r, _ in conns),
                                   closed_within(body_r, bound))
    took = time.monotonic() - opened
    trickler.cancel()
    for _, w in [*conns, (body_r, body_w)]:
        w.close()
    still_open = sum(res is None for res in results)
    print(f"\n500 half-sent heads and a half-sent body: {still_open} still open after "
          f"{took:.1f} s", flush=True)
    assert still_open == 0
    assert all(res.startswith(b"HTTP/1.1 408 ") for res in results[:-1] if res)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200


async def test_a_flood_of_connections_cannot_keep_a_request_out(
        live: LiveConsole, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the connection cap, a new connection closes the oldest one still waiting for
    its head: with 300 silent sockets against a cap of 100, at most 100 stay open and a
    request made after them is answered."""
    monkeypatch.setattr(web.protocol, "MAX_CONNECTIONS", 100)
    monkeypatch.setattr(web.protocol, "HEAD_TIMEOUT", 120.0)  # only the cap closes them here
    port = int(live.url.rsplit(":", 1)[1])
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        r = await client.get("/healthz")
    assert r.status_code == 200
    results = await asyncio.gather(*(closed_within(r, 3) for r, _ in conns))
    for _, w in conns:
        w.close()
    open_ = sum(res is None for res in results)
    assert open_ <= 100, f"{open_} silent connections kept over a cap of 100"
    assert all(res is None for res in results[-90:]), "the newest should have stayed"


async def test_an_idle_keep_alive_connection_is_closed(live: LiveConsole) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = re.search(rb"content-length: (\d+)", head.lower())
    assert length, head
    await reader.readexactly(int(length.group(1)))
    t0 = time.monotonic()
    rest = await closed_within(reader, web.protocol.KEEP_ALIVE + 20)
    writer.close()
    assert rest == b"", f"still open {time.monotonic() - t0:.1f} s after its answer"
