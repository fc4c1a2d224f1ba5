"""Redis shards: connections, auto-pipelining, Lua script loading, rendezvous routing.

Every call a process makes to a shard goes through `Shard.call` on one pipelined
connection (dq/resp.py): what is queued in one event-loop turn goes out in one write.
So a server with 50 busy connections talks to each shard in batches, not one command per
round trip. `Shard.client` (redis-py) is kept for blocking and admin commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from dq.errors import DqError
from dq.resp import RespConnection

log = logging.getLogger(__name__)

SCRIPT_NAMES = (
    "add", "delete", "move_due", "claim", "ack", "retry", "bury", "requeue_expired", "redrive",
)


def _load_scripts() -> dict[str, tuple[str, str]]:
    """name -> (sha1, source) for every dq/lua/*.lua script."""
    out = {}
    for name in SCRIPT_NAMES:
        src = resources.files("dq").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")
        out[name] = (hashlib.sha1(src.encode()).hexdigest(), src)
    return out


SCRIPTS = _load_scripts()


def _weight(name: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest(), "big")


class Shard:
    """One Redis server: a client, its batched command queue and its health."""

    def __init__(self, name: str, url: str, *, connect_timeout: float = 1.0,
                 command_timeout: float = 5.0) -> None:
        self.name = name
        self.url = url
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout, socket_timeout=command_timeout,
            socket_keepalive=True, health_check_interval=0, max_connections=64,
        )
        self.conn = RespConnection(url, name=name, connect_timeout=connect_timeout)
        self.up = True
        self.down_since = 0.0
        self.failures = 0
        self._loading: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"<Shard {self.name} {'up' if self.up else 'down'}>"

    async def call(self, *args: Any) -> Any:
        """Send one command on the shard's pipelined connection and wait for its reply."""
        try:
            res = await self.conn.call(*args)
        except DqError as exc:
            self._mark_failure(exc)
            raise
        self.failures = 0
        return res

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a dq/lua script by name (EVALSHA, batched; reloaded when Redis lost it)."""
        return await self.evalsha((SCRIPTS[name][0], len(keys), *keys, *args))

    async def evalsha(self, args: tuple[Any, ...]) -> Any:
        """EVALSHA sha numkeys keys... args...; scripts are reloaded when Redis lost them."""
        try:
            return await self.call("EVALSHA", *args)
        except NoScriptError:
            await self.load_scripts()
            return await self.call("EVALSHA", *args)

    async def load_scripts(self) -> None:
        """Load every script (after a restart Redis has none). Concurrent callers share
        one load instead of each sending its own."""
        if self._loading is None:
            loads = [self.call("SCRIPT", "LOAD", src) for _sha, src in SCRIPTS.values()]
            fut: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*loads))
            fut.add_done_callback(self._loaded)
            self._loading = fut
        await asyncio.shield(self._loading)

    def _loaded(self, fut: asyncio.Future[Any]) -> None:
        self._loading = None
        if not fut.cancelled():
            fut.exception()  # retrieved here; the awaiting callers see it too

    def _mark_failure(self, exc: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("redis shard %s failed: %s", self.name, exc)

    def mark(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.down_since = 0.0 if up else time.time()

    async def close(self) -> None:
        self.conn.close()
        await self.client.aclose()


class ShardSet:
    """The configured shards and the rendezvous order of each tid over their names."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        if not shards:
            raise ValueError("at least one redis shard is needed")
        self.shards = list(shards)
        self.by_name = {s.name: s for s in self.shards}

    @classmethod
    def from_urls(cls, urls: Iterable[str] | Iterable[tuple[str, str]], **kw: Any) -> ShardSet:
        """Shards from URLs (each named by its URL) or (name, url) pairs."""
        shards = []
        for item in urls:
            name, url = (item, item) if isinstance(item, str) else item
            shards.append(Shard(name, url, **kw))
        return cls(shards)

    def order(self, tid: str) -> list[Shard]:
        """All shards, the tid's owner first (rendezvous hashing over shard names)."""
        if len(self.shards) == 1:
            return self.shards
        return sorted(self.shards, key=lambda s: _weight(s.name, tid), reverse=True)

    def owner(self, tid: str) -> Shard:
        return self.order(tid)[0]

    def writable(self, tid: str) -> Shard:
        """The shard an add goes to: the owner, or the next healthy one while it is down."""
        order = self.order(tid)
        for shard in order:
            if shard.up:
                return shard
        return order[0]

    async def load_scripts(self) -> None:
        await asyncio.gather(*(s.load_scripts() for s in self.shards), return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards), return_exceptions=True)
