"""The consumer process: its claim loops (one per shard), the callback slots they share,
and how it starts and stops (`run`). What becomes of each claimed job is Delivery's
(dq/roles/consumer/deliver.py); the mails are Alerts' (dq/roles/consumer/alerts.py)."""

from __future__ import annotations

import asyncio
import logging
import time

from dq.registry.core import Registry
from dq.registry.topics import TopicCache
from dq.roles.callback import open_session
from dq.roles.consumer.alerts import Alerts
from dq.roles.consumer.deliver import SHARD_ERRORS, Delivery
from dq.roles.consumer.priority import priority_order
from dq.roles.flow import shard_limits
from dq.roles.netpolicy import CallbackPolicy
from dq.runtime.context import Context, Duty
from dq.runtime.loops import DOWN_WAIT, Backoff, pause, shard_backoff
from dq.runtime.resources import RoleResources, role_resources
from dq.sharding.shards import Shard
from dq.storage.store import FlowLimit, Store

log = logging.getLogger("dq.consumer")

IDLE_MIN = 0.005
IDLE_MAX = 0.05
HELD_LOOK = 1.0  # seconds between a claim loop's looks at which topics have held jobs


class Slots:
    """Free callback slots, taken in bulk by claim loops and given back one by one."""

    def __init__(self, n: int) -> None:
        self.free = n
        self.freed = asyncio.Event()

    async def take(self, stopping: asyncio.Event, most: int) -> int:
        """The free slots, `most` at most (at least one), or 0 once stopping is set."""
        while self.free == 0 and not stopping.is_set():
            self.freed.clear()
            await self.freed.wait()
        if stopping.is_set():
            return 0
        n = min(self.free, most)
        self.free -= n
        return n

    def give(self, n: int = 1) -> None:
        if n > 0:
            self.free += n
            self.freed.set()


class Consumer(Delivery):
    """One consumer process's work over all shards: claim loops feeding the deliveries."""

    def __init__(self, ctx: Context, store: Store, topics: TopicCache,
                 registry: Registry | None, *, resources: RoleResources | None = None) -> None:
        # the registry, opened when first needed if none was given (role_resources closes it)
        self.resources = resources or RoleResources(ctx.settings, store=store,
                                                    registry=registry)
        super().__init__(ctx, store, topics, Alerts(ctx, store, topics, self.resources))
        self.slots = Slots(ctx.settings.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        # Per shard: (topics generation, held topics, the flow limits built from them),
        # and when its held topics were last looked at (monotonic).
        self._flow: dict[str, tuple[int, frozenset[str], list[FlowLimit]]] = {}
        self._held_seen: dict[str, float] = {}

    async def serve(self) -> None:
        loops: list[asyncio.Task[None]] = []
        shard_urls = [s.url for s in self.store.shards.shards]
        policy = await asyncio.to_thread(CallbackPolicy.build, self.settings, shard_urls)
        async with open_session(self.settings.concurrency, policy) as session:
            self.session = session
            try:
                loops = [asyncio.create_task(self._claim_loop(s), name=f"claim:{s.name}")
                         for s in self.store.shards.shards]
                if self.ctx.does(Duty.ALERT_SWEEP):
                    loops.append(asyncio.create_task(self.alerts.sweep(), name="alerts"))
                await self.ctx.stopping.wait()
                self.slots.freed.set()  # wake claim loops waiting for a slot
                await asyncio.gather(*loops)
                await self._drain()
            finally:
                # Reached early only when this task is cancelled (a hard kill): no drain.
                for t in (*loops, *self.tasks):
                    t.cancel()
                await asyncio.gather(*loops, *self.tasks, *self.writes, return_exceptions=True)
        await self.alerts.wait()

    async def _drain(self) -> None:
        grace = self.settings.grace
        if self.tasks:
            log.info("%s: waiting up to %.1fs for %d callbacks in flight", self.ctx.name,
                     grace, len(self.tasks))
            _done, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            if pending:
                log.warning("%s: %d callbacks still running after %.1fs are cancelled; their "
                            "leases expire and the jobs are delivered again", self.ctx.name,
                            len(pending), grace)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        if self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)

    async def _claim_loop(self, shard: Shard) -> None:
        idle, backoff = Backoff(IDLE_MIN, IDLE_MAX), shard_backoff()
        weights = self.settings.priority_weights
        # A claim holds its slots until Redis answers: one on a shard that hangs must
        # leave slots to the other shards' loops (a loop with work claims again at once).
        share = -(-self.settings.concurrency // len(self.store.shards.shards))
        while not self.ctx.stopping.is_set():
            if not shard.up:  # marked down by the checker, or its breaker is open
                await pause(self.ctx.stopping, DOWN_WAIT)
                continue
            n = await self.slots.take(self.ctx.stopping, share)
            if n == 0:
                break
            try:
                flow = await self._flow_limits(shard)
                leased = time.monotonic()  # no later than the lease's start on the shard
                jobs = await self.store.claim(shard, n, priority_order(weights), self.lease_ms,
                                              flow)
            except Exception as exc:
                self.slots.give(n)
                self._claim_failed(shard, exc, backoff.delay)
                await backoff.wait(self.ctx.stopping)
                continue
            backoff.reset()
            self.slots.give(n - len(jobs))
            for c in jobs:
                task = asyncio.create_task(self._deliver(c, leased))
                self.tasks.add(task)
                task.add_done_callback(self._delivered)
            if jobs:
                idle.reset()
            else:
                await idle.wait(self.ctx.stopping)

    def _claim_failed(self, shard: Shard, exc: Exception, retry_in: float) -> None:
        if isinstance(exc, SHARD_ERRORS):
            log.warning("%s: claim on shard %s failed (%s: %s); retrying in %.1fs",
                        self.ctx.name, shard.label, exc.__class__.__name__, exc, retry_in)
        else:
            log.exception("%s: claim on shard %s failed", self.ctx.name, shard.name)

    async def _flow_limits(self, shard: Shard) -> list[FlowLimit]:
        """The flow limits to claim with on `shard`: rebuilt when the topics were reloaded
        or the topics with held jobs there changed (looked at every HELD_LOOK seconds)."""
        generation = await self.topics.current()
        gen, held, limits = self._flow.get(shard.name, (-1, frozenset(), []))
        now = time.monotonic()
        if now - self._held_seen.get(shard.name, -HELD_LOOK) >= HELD_LOOK:
            self._held_seen[shard.name] = now
            seen = frozenset(await self.store.stats.held_topics(shard))
            if seen != held:
                held, gen = seen, -1
        if gen != generation:
            names = [s.name for s in self.store.shards.shards]
            limits = shard_limits(self.topics.all(), held, shard.name, names)
            self._flow[shard.name] = (generation, held, limits)
        return limits

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.give(1)


async def run(ctx: Context, store: Store | None = None, topics: TopicCache | None = None,
              *, registry: Registry | None = None) -> None:
    """Run consumer `ctx.index` until `ctx.stopping` is set and its callbacks are drained.

    Opens (and then closes) the store and registry it is not given. Alert settings come
    from `registry`, else from a registry opened on `settings.db_url()` when first needed.
    """
    settings = ctx.settings
    async with role_resources(ctx, store=store, registry=registry,
                              open_registry=topics is None) as res:
        if topics is None:
            assert res.registry is not None
            topics = TopicCache(res.registry, refresh=settings.registry_refresh)
        consumer = Consumer(ctx, res.store, topics, res.registry, resources=res)
        started = time.monotonic()
        log.info("%s started: %d shard(s), concurrency %d, lease %.1fs, retry unit %.1fs",
                 ctx.name, len(res.store.shards.shards), settings.concurrency, settings.lease,
                 settings.retry_unit)
        try:
            await consumer.serve()
        finally:
            log.info("%s stopped after %.0fs: delivered=%d retried=%d dead=%d failed=%d "
                     "parked=%d deferred=%d", ctx.name, time.monotonic() - started,
                     consumer.delivered, consumer.retried, consumer.dead, consumer.failed,
                     consumer.parked, consumer.deferred)
