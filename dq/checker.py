"""The checker role: ping every Redis shard and say when one goes down or comes back.

Minimal for now (issue "shard health" extends it with alerts): one PING per shard every
`settings.checker_interval` seconds, one warning line when a shard stops answering and
one line when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from redis.exceptions import RedisError

from dq.config import Settings
from dq.shards import Shard, ShardSet
from dq.worker import Context, shard_urls

log = logging.getLogger(__name__)


def safe_name(text: str) -> str:
    """A shard name or URL with any password masked, fit for a log line."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


def _registry_shards(settings: Settings) -> list[tuple[str, str]]:
    from dq.registry import Registry

    registry = Registry(settings.db_url())
    try:
        return [(s.name or s.url, s.url) for s in registry.shards() if s.enabled]
    finally:
        registry.close()


async def ping(shard: Shard, timeout: float) -> str:
    """'' when the shard answers PING within `timeout`, else why not."""
    try:
        async with asyncio.timeout(timeout):
            await shard.client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    return ""


class Checker:
    """One round of pings over every shard, remembering which are down."""

    def __init__(self, ctx: Context, shards: ShardSet) -> None:
        self.ctx = ctx
        self.shards = shards
        self.timeout = max(0.2, min(ctx.settings.checker_interval, 5.0))
        self.rounds = 0
        self.failures = 0

    async def check(self) -> None:
        errors = await asyncio.gather(*(ping(s, self.timeout) for s in self.shards.shards))
        self.rounds += 1
        for shard, error in zip(self.shards.shards, errors, strict=True):
            if error:
                self.failures += 1
                if shard.up:
                    log.warning("%s: redis shard %s is down: %s", self.ctx.name,
                                safe_name(shard.name), error)
            elif not shard.up:
                log.info("%s: redis shard %s is back up", self.ctx.name, safe_name(shard.name))
            shard.mark(not error)


async def run(ctx: Context) -> None:
    """Ping every shard every checker_interval seconds until ctx.stopping is set."""
    settings = ctx.settings
    try:
        extra = await asyncio.to_thread(_registry_shards, settings)
    except Exception as exc:
        log.warning("%s: cannot read shards from the registry (%s); checking the configured "
                    "ones", ctx.name, exc)
        extra = []
    shards = ShardSet.from_urls(shard_urls(settings, extra), connect_timeout=1.0,
                                command_timeout=2.0)
    checker = Checker(ctx, shards)
    log.info("%s started: %d shard(s), every %.1f s", ctx.name, len(shards.shards),
             settings.checker_interval)
    try:
        while not ctx.stopping.is_set():
            await checker.check()
            ctx.ready.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.checker_interval):
                    await ctx.stopping.wait()
    finally:
        await shards.close()
        log.info("%s stopped: rounds=%d failures=%d", ctx.name, checker.rounds,
                 checker.failures)
