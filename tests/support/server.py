"""A dq server as a task of the test's loop (start_server), and raw framed exchanges with it."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dq.config import Settings
from dq.registry.core import Registry, Topic
from dq.registry.topics import TopicCache
from dq.roles.server import Server, run
from dq.runtime.context import Context
from dq.sharding.shards import ShardSet
from dq.storage.store import Store


def make_topic(key: str, **kw: Any) -> Topic:
    fields: dict[str, Any] = dict(
        id=0, topic=key, name=key, delay=60, callback="http://127.0.0.1:9/cb", method="POST",
        timeout_ms=3000, emails=(), retry_when="", priority=2, online=True, max_attempts=0,
        secret="", body_format="form", creator="test")
    fields.update(kw)
    return Topic(**fields)


@dataclass
class Running:
    port: int
    store: Store
    registry: Registry
    server: Server

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_server(tmp: Path, urls: list[str], **settings: Any) -> tuple[Running, Context,
                                                                          asyncio.Task[None]]:
    registry = Registry(f"sqlite:///{tmp / 'reg.sqlite3'}")
    registry.save_topic(make_topic("order"))
    registry.save_topic(make_topic("off", online=False))
    s = Settings(port=0, host="127.0.0.1", redis=tuple(urls), **settings)
    store = Store(ShardSet.from_urls(urls, command_timeout=s.redis_timeout), buckets=s.buckets,
                  add_timeout=s.add_timeout)
    ctx = Context(s, "server")
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(ctx, store, TopicCache(registry, refresh=0.2), ready))
    server = await asyncio.wait_for(ready, 10)
    return Running(server.port, store, registry, server), ctx, task


def raw_exchange(port: int, data: bytes, *, read: int = 1, timeout: float = 3.0) -> list[Any]:
    """Send raw bytes, read `read` reply frames (or until the server closes)."""
    out: list[Any] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while len(out) < read:
            while len(buf) < 4 or len(buf) < 4 + int(buf[:4]):
                chunk = s.recv(65536)
                if not chunk:
                    return out
                buf += chunk
            n = int(buf[:4])
            out.append(json.loads(buf[4:4 + n]))
            buf = buf[4 + n:]
    return out


def frame(obj: Any) -> bytes:
    text = json.dumps(obj).encode()
    return b"%04d" % len(text) + text
