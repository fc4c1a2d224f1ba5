"""The checker process: its store, its rounds (health, then retired shards, then guests),
the duties that run beside them, and how it starts and stops (`run`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from dq.config import Settings
from dq.registry.core import Registry
from dq.roles.checker.guests import Retirement, adopt_loop, sweep_guests
from dq.roles.checker.health import MAIL_EVERY, Checker
from dq.roles.checker.watch import export_loop, watch_shards
from dq.roles.statexport import StatExporter
from dq.runtime.context import Context
from dq.runtime.loops import pause
from dq.runtime.resources import role_resources
from dq.sharding import cluster
from dq.sharding.plan import ShardPlan
from dq.sharding.shards import ShardSet
from dq.storage.adopt import Adopter
from dq.storage.guests import GuestMover
from dq.storage.store import Store

log = logging.getLogger("dq.checker")


def checker_store(settings: Settings, plan: ShardPlan) -> Store:
    """The checker's own store: short command timeouts, and no health record to follow
    (it writes that record)."""
    shards = ShardSet.from_urls(plan.shards, plan.retired, command_timeout=2.0,
                                cluster_partitions=settings.cluster_partitions,
                                replica_acks=settings.replica_acks)
    return Store(shards, prefix=settings.prefix, buckets=settings.buckets, zone=settings.zone,
                 orig_prefix=settings.adopt_prefix)


async def _warn_stray(shards: ShardSet, prefix: str) -> None:
    await cluster.warn_stray(shards.shards, prefix)


def _start_duties(ctx: Context, checker: Checker, store: Store, mover: GuestMover,
                  registry: Registry | None) -> list[asyncio.Task[None]]:
    """The loops beside the rounds that stop with it: adoption, counter export, and the
    one-time look for stray Redis Cluster jobs."""
    settings = ctx.settings
    duties = []
    if settings.adopt_prefix:
        duties.append(asyncio.create_task(
            adopt_loop(ctx, checker, Adopter(store), mover, registry), name="adopt"))
    if registry is not None:
        duties.append(asyncio.create_task(
            export_loop(ctx, StatExporter(store, registry)), name="stat-export"))
    # a Redis Cluster's jobs under another cluster_partitions count: said once, at start
    duties.append(asyncio.create_task(_warn_stray(store.shards, settings.prefix),
                                      name="cluster-stray"))
    return duties


async def _stop_duties(duties: list[asyncio.Task[None]]) -> None:
    # the last export runs on stopping; adoption stops where it is (a later pass goes on)
    with contextlib.suppress(Exception, TimeoutError):
        async with asyncio.timeout(5.0):
            await asyncio.gather(*duties, return_exceptions=True)
    for task in duties:
        task.cancel()


async def _rounds(ctx: Context, checker: Checker, store: Store, mover: GuestMover) -> None:
    """Every checker_interval seconds until stopping: ping, empty retired shards, move
    guests home (for at most half the interval)."""
    interval = ctx.settings.checker_interval
    retirement = Retirement(ctx, store)
    while not ctx.stopping.is_set():
        started = time.monotonic()
        await checker.check()
        ctx.ready.set()
        await retirement.run(checker.answering)
        await sweep_guests(checker, mover, budget=interval / 2)
        await pause(ctx.stopping, max(0.0, interval - (time.monotonic() - started)))


async def run(ctx: Context, *, registry: Registry | None = None,
              mail_every: float = MAIL_EVERY) -> None:
    """Ping every shard every checker_interval seconds until ctx.stopping is set."""
    settings = ctx.settings

    def no_registry(exc: Exception) -> None:
        log.warning("%s: cannot read the registry (%s); checking the configured shards, "
                    "without alert mail", ctx.name, exc)

    async with role_resources(ctx, registry=registry, open_registry=True,
                              make_store=checker_store, registry_failed=no_registry) as res:
        store, registry, plan = res.store, res.registry, res.plan
        assert plan is not None
        checker = Checker(ctx, store.shards, registry=registry, mail_every=mail_every)
        mover = GuestMover(store)
        log.info("%s started: %d shard(s), every %.1f s, down after %.1f s, record %s",
                 ctx.name, len(store.shards.shards), settings.checker_interval,
                 settings.shard_down_after, checker.path)
        watch = None if registry is None else asyncio.create_task(
            watch_shards(ctx, registry, plan, settings.registry_refresh))
        duties = _start_duties(ctx, checker, store, mover, registry)
        try:
            await _rounds(ctx, checker, store, mover)
        finally:
            if watch is not None:
                watch.cancel()
            await _stop_duties(duties)
            await checker.wait_mails(12.0)
            log.info("%s stopped: rounds=%d failures=%d changes=%d mailed=%d guests_moved=%d "
                     "adopted=%d", ctx.name, checker.rounds, checker.failures, checker.changes,
                     checker.mailed, checker.guests_moved, checker.adopted)
