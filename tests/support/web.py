"""The console under test (open_web over httpx's ASGI transport), its login, forms and
flash messages, and an SMTP inbox that keeps aiosmtpd's envelopes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from dq.config import Settings
from dq.registry.core import Registry, Topic
from dq.roles import consumer, timer
from dq.runtime.context import Context, open_store
from dq.storage.store import Store
from tests.support.receiver import Receiver, Reply
from web.app import create_app

PW = "s3cret-pw"


BASE = "http://127.0.0.1"


GOOD_TOPIC = {"topic": "order_timeout", "name": "Cancel unpaid orders", "delay": 1800,
              "callback": "https://shop.example.com/hooks/order", "method": "POST",
              "timeout_ms": 5000, "emails": ["ops@example.com", "dev@example.com"],
              "retry_when": "{res.code}!=200", "priority": 1, "status": "online",
              "max_attempts": 5, "secret": "hush", "body_format": "json", "creator": "ann"}


@dataclass
class Web:
    app: FastAPI
    api: httpx.AsyncClient  # sends the password (Basic)
    anon: httpx.AsyncClient  # sends nothing
    registry: Registry
    store: Store
    settings: Settings
    transport: httpx.ASGITransport  # for more clients of the same app (another session)


def web_settings(redis_url: str, **kw: Any) -> Settings:
    return Settings(redis=(redis_url,), **{"web_password": PW, **kw})


@contextlib.asynccontextmanager
async def open_web(redis_url: str, db_url: str, **settings: Any) -> AsyncIterator[Web]:
    """The app over a real registry and store, with an API client and an anonymous one."""
    conf = web_settings(redis_url, **settings)
    registry = Registry(db_url)
    store = open_store(conf)
    app = create_app(conf, registry=registry, store=store)
    transport = httpx.ASGITransport(app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                     auth=("admin", PW)) as api, \
                httpx.AsyncClient(transport=transport, base_url=BASE) as anon:
            yield Web(app, api, anon, registry, store, conf, transport)
    finally:
        await store.shards.close()
        registry.close()


async def bury(store: Store, topic: str, job_id: str, body: dict[str, Any] | None = None) -> None:
    """Make (topic, job_id) a dead letter the way a consumer would."""
    await store.add(topic, job_id, body or {"n": job_id}, delay_ms=0)
    shard = store.shards.shards[0]
    await store.move_due(shard, range(store.buckets))
    for c in await store.claim(shard, 100, [1, 2, 3], 30000):
        await store.bury(c, {"status": 500, "error": "boom"})


async def make_topic(w: Web, **fields: Any) -> dict[str, Any]:
    r = await w.api.post("/api/topics", json={**GOOD_TOPIC, **fields})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_error(r: httpx.Response, status: int, err: str, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "err", "errors"}
    assert body["err"] == err
    assert body["detail"]
    if field is not None:
        assert field in body["errors"], body


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


async def login(client: httpx.AsyncClient, password: str = PW) -> str:
    """Log the client in; returns the CSRF token of its new session."""
    page = await client.get("/login")
    r = await client.post("/login", data={"csrf": csrf_of(page.text), "password": password,
                                          "next": "/"})
    assert r.status_code == 303, r.text
    return csrf_of((await client.get("/topics")).text)


def flash(r: httpx.Response) -> str:
    match = re.search(r'<div class="flash (?:ok|error)" role="status">(.*?)</div>', r.text, re.S)
    return match.group(1).strip() if match else ""


async def follow(client: httpx.AsyncClient, r: httpx.Response) -> httpx.Response:
    assert r.status_code == 303, r.text
    return await client.get(r.headers["location"])


async def fail_once(settings: Settings, topic: str, job_id: str, reply: Reply) -> None:
    """Register `topic` with a real receiver that answers `reply`, add `job_id`, and run a
    real timer and consumer until the consumer has failed one attempt and scheduled the
    next (`settings.retry_unit` later)."""
    registry = Registry(settings.db)
    store = open_store(settings)
    ctxs = [Context(settings, "timer"), Context(settings, "consumer")]
    try:
        async with Receiver() as rcv:
            rcv.routes["/hook"] = lambda req: reply
            registry.save_topic(Topic(topic=topic, name=topic, callback=rcv.url("/hook"),
                                      method="POST", max_attempts=5))
            await store.add(topic, job_id, {"order": 7}, delay_ms=0)
            tasks = [asyncio.create_task(timer.run(ctxs[0])),
                     asyncio.create_task(consumer.run(ctxs[1]))]
            try:
                deadline = time.monotonic() + 30
                while (info := await store.lookup(topic, job_id)) is None or info.attempt < 1:
                    assert time.monotonic() < deadline, "the consumer made no attempt"
                    assert not any(t.done() for t in tasks), [t.result() for t in tasks]
                    await asyncio.sleep(0.1)
                assert len(rcv.calls(job_id)) == 1
            finally:
                for ctx in ctxs:
                    ctx.stopping.set()
                await asyncio.gather(*tasks)
    finally:
        await store.shards.close()
        registry.close()


