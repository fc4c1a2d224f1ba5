"""The server role's entry: open what it needs, serve until stopping, drain, close.

`run(ctx)` opens the registry's topic cache and the store through `role_resources`
(dq/runtime/resources.py; a test may hand its own of either, which stay open), loads the
Lua scripts into every shard, starts a Server (dq/roles/server/listener.py), keeps the
reaper (dq/roles/server/connection.py) and the topic refresh running beside it, and once
`ctx.stopping` is set drains the server, closes what it opened and logs the process's
counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dq.registry.topics import TopicCache
from dq.roles.server.connection import reap
from dq.roles.server.listener import Server
from dq.runtime.context import Context
from dq.runtime.resources import role_resources
from dq.storage.store import Store

log = logging.getLogger("dq.server")


async def refresh_topics(topics: TopicCache, every: float) -> None:
    while True:
        await topics.refresh()
        await asyncio.sleep(every)


async def run(ctx: Context, store: Store | None = None, topics: TopicCache | None = None,
              ready: asyncio.Future[Any] | None = None) -> None:
    """The server role: serve until ctx.stopping is set, then drain."""
    settings = ctx.settings
    server: Server | None = None
    try:
        async with role_resources(ctx, store=store, open_registry=topics is None) as res:
            if topics is None:
                assert res.registry is not None
                topics = TopicCache(res.registry, refresh=settings.registry_refresh)
            server = await _start(ctx, res.store, topics)
            ctx.ready.set()
            if ready is not None:
                ready.set_result(server)
            tasks = [asyncio.create_task(reap(server.connections, settings)),
                     asyncio.create_task(refresh_topics(topics, settings.registry_refresh))]
            try:
                await ctx.stopping.wait()
                await server.drain()
            finally:
                server.stop()
                if server.receiver is not None:
                    server.receiver.close()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:  # after the store and registry are closed, as it stopped or failed
        if server is not None:
            _log_stopped(ctx, server)


def _log_stopped(ctx: Context, server: Server) -> None:
    s = server.handler.stats
    log.info("%s stopped: add=%d get=%d del=%d fail=%d failover=%d refused=%d "
             "adopted=%d handed=%d", ctx.name, s["add"], s["get"], s["del"], s["fail"],
             s["failover"], server.refused,
             server.receiver.adopted if server.receiver else 0, server.handed)


async def _start(ctx: Context, store: Store, topics: TopicCache) -> Server:
    """The topics read, the scripts loaded, a Server accepting."""
    settings = ctx.settings
    await topics.refresh(force=True)
    # The scripts in Redis before the first request: an add that finds them missing is
    # run again on its own, after a get pipelined behind it (which then misses the job).
    try:
        async with asyncio.timeout(settings.redis_timeout):
            await store.shards.load_scripts()
    except TimeoutError:
        log.warning("%s: a shard did not load the scripts within %g s; serving anyway",
                    ctx.name, settings.redis_timeout)
    server = Server(ctx, store, topics)
    await server.start()
    log.info("%s serving on port %d (%d shards)", ctx.name, server.port,
             len(store.shards.shards))
    return server
