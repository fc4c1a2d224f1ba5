"""What every child process shares: its context, and how it opens the store and registry.

A role (server, timer, consumer, checker, web) is an `async def run(ctx: Context)` that
returns once `ctx.stopping` is set and its work is drained. The master's child machinery
(post-fork setup, asyncio.run, signal flags, heartbeat, parent-death check) builds the
Context and calls it; tests call the same function in-process.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path

from dq.config import Settings
from dq.shards import ShardSet
from dq.store import Store


@dataclass
class Context:
    """One running role: its settings, its number, and the flag that asks it to stop."""

    settings: Settings
    role: str
    index: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    listen_sock: socket.socket | None = None  # the master's TCP socket, for servers

    @property
    def name(self) -> str:
        if self.role in ("checker", "web"):
            return f"dq-{self.role}"
        return f"dq-{self.role}-{self.index}"


def embedded_redis_url(settings: Settings) -> str:
    """Where the embedded redis-server listens: a unix socket in the data dir."""
    return f"unix://{Path(settings.data_dir).resolve() / 'redis.sock'}"


def shard_urls(settings: Settings, extra: list[tuple[str, str]] | None = None) -> list[
        tuple[str, str]]:
    """(name, url) of every shard: configured URLs, then the registry's, else embedded."""
    named = [(url, url) for url in settings.redis]
    seen = {url for _, url in named}
    for name, url in extra or []:
        if url not in seen:
            named.append((name, url))
            seen.add(url)
    if not named:
        url = embedded_redis_url(settings)
        named.append(("embedded", url))
    return named


def open_store(settings: Settings, extra_shards: list[tuple[str, str]] | None = None) -> Store:
    """A Store over every shard. Connections are made lazily, inside the running loop."""
    shards = ShardSet.from_urls(shard_urls(settings, extra_shards))
    return Store(shards, prefix=settings.prefix, buckets=settings.buckets, zone=settings.zone)
