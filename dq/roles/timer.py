"""Timer role: move due jobs from the delay buckets to the ready lists, on every shard.

Timer `ctx.index` of `settings.timers` owns the buckets b with b % timers == index on every
shard, so timers never compete for a bucket. Per shard one task loops: move what is due
(again at once while full batches come out), requeue jobs whose consumer lease ran out
(at most every 100 ms), then sleep until the next due job or `timer_tick`, whichever is
sooner. The timer with Duty.REBUCKET (timer 0, dq/runtime/context.py) also keeps the
delayed jobs in the buckets the `buckets` setting gives them, should that setting change
(Maintenance.rebucket).

The sleep is timed here, not by Redis: a BLPOP's own timeout fires on Redis's cron (every
100 ms at the default hz 10), which would make jobs up to 100 ms late. Instead a second task
per shard keeps a BLPOP (timeout <= tick) on the owned buckets' wake lists and sets an event
when an add or retry made a job the earliest of its bucket; the sleep ends at the due time
or on that event, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from redis.exceptions import RedisError

from dq.errors import DqError
from dq.runtime.context import Context, Duty
from dq.runtime.loops import DOWN_WAIT, pause, shard_backoff
from dq.runtime.resources import role_resources
from dq.sharding.shards import Shard
from dq.storage.store import Store

log = logging.getLogger("dq.timer")

MOVE_LIMIT = 1000
REQUEUE_LIMIT = 1000
MIN_WAIT = 0.001
REQUEUE_EVERY = 0.1  # seconds; expired leases need no finer check than this
LAYOUT_EVERY = 60.0  # seconds between Duty.REBUCKET's looks at each shard's bucket layout
SHARD_ERRORS = (DqError, RedisError, OSError, asyncio.TimeoutError)


def owned_buckets(buckets: int, timers: int, index: int) -> list[int]:
    """The buckets timer `index` of `timers` works on each shard."""
    return [b for b in range(buckets) if b % timers == index]


class Timer:
    """One timer process's work over all shards, with its counters."""

    def __init__(self, ctx: Context, store: Store) -> None:
        self.ctx = ctx
        self.store = store
        self.tick = max(ctx.settings.timer_tick, 0.01)
        self.owned = owned_buckets(store.buckets, ctx.settings.timers, ctx.index)
        self.wake_keys = store.keys.wake_of(self.owned)
        self.moved = 0
        self.requeued = 0
        self.errors = 0
        self._requeued_at: dict[str, float] = {}  # shard name -> monotonic time

    async def serve(self) -> None:
        if not self.owned:
            log.warning("%s owns no bucket (%d buckets, %d timers); it stays idle",
                        self.ctx.name, self.store.buckets, self.ctx.settings.timers)
            await self.ctx.stopping.wait()
            return
        tasks = [asyncio.create_task(self._shard_loop(s), name=f"timer:{s.name}")
                 for s in self.store.shards.shards]
        if self.ctx.does(Duty.REBUCKET):
            tasks.append(asyncio.create_task(self._layout_loop(), name="timer:layout"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shard_loop(self, shard: Shard) -> None:
        wake = asyncio.Event()
        waker = asyncio.create_task(self._wake_loop(shard, wake), name=f"wake:{shard.name}")
        backoff = shard_backoff()
        stopping = self.ctx.stopping
        try:
            while not stopping.is_set():
                if not shard.up:  # marked down by the checker, or its breaker is open
                    await pause(stopping, DOWN_WAIT)
                    continue
                wake.clear()  # before the sweep: a wake landing during it is not lost
                try:
                    wait = await self._sweep(shard)
                except SHARD_ERRORS as exc:
                    self._failed(shard, "sweep", exc, backoff.delay)
                    await backoff.wait(stopping)
                    continue
                if backoff.reset():
                    log.info("timer: shard %s answers again", shard.label)
                if wait > 0:
                    await self._wait(wake, wait)
        finally:
            waker.cancel()
            await asyncio.gather(waker, return_exceptions=True)

    async def _sweep(self, shard: Shard) -> float:
        """Move due jobs and requeue expired leases; seconds until the next due job."""
        while True:
            moved, nxt, now = await self.store.move_due(shard, self.owned, limit=MOVE_LIMIT)
            self.moved += moved
            if moved < MOVE_LIMIT or self.ctx.stopping.is_set():
                break
        if time.monotonic() - self._requeued_at.get(shard.name, 0.0) >= REQUEUE_EVERY:
            while True:
                n = await self.store.maintenance.requeue_expired(shard, limit=REQUEUE_LIMIT)
                self.requeued += n
                if n < REQUEUE_LIMIT or self.ctx.stopping.is_set():
                    break
            self._requeued_at[shard.name] = time.monotonic()
        if nxt is None:
            return self.tick
        # Relative to the shard's clock, so a skewed local clock does not matter.
        return min(self.tick, max((nxt - now) / 1000, MIN_WAIT))

    async def _wait(self, wake: asyncio.Event, seconds: float) -> None:
        """Sleep `seconds`, or less when woken or asked to stop."""
        if wake.is_set() or self.ctx.stopping.is_set():
            return
        stop = asyncio.ensure_future(self.ctx.stopping.wait())
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait((stop, woken), timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            woken.cancel()

    async def _layout_loop(self) -> None:
        """Duty.REBUCKET (timer 0) keeps each shard's delayed jobs in the buckets the
        `buckets` setting gives them (Maintenance.rebucket): at start, after a change of the
        setting, and then every LAYOUT_EVERY seconds (a shard that did not answer is looked
        at then)."""
        while not self.ctx.stopping.is_set():
            for shard in self.store.shards.shards:
                if self.ctx.stopping.is_set():
                    return
                try:
                    await self.store.maintenance.rebucket(shard)
                except Exception as exc:  # not fatal to the timer: it moves due jobs on
                    log.warning("timer: checking the buckets of shard %s failed (%s: %s); "
                                "trying again in %.0fs", shard.label, exc.__class__.__name__,
                                exc, LAYOUT_EVERY)
            await pause(self.ctx.stopping, LAYOUT_EVERY)

    async def _wake_loop(self, shard: Shard, wake: asyncio.Event) -> None:
        """BLPOP the owned wake lists; set `wake` for every pop. Ends when stopping."""
        backoff = shard_backoff()
        timeout = min(self.tick, 1.0)
        while not self.ctx.stopping.is_set():
            try:
                got = await shard.client.blpop(self.wake_keys, timeout=timeout)
            except SHARD_ERRORS as exc:
                self._failed(shard, "wake", exc, backoff.delay)
                await backoff.wait(self.ctx.stopping)
                continue
            backoff.reset()
            if got is not None:
                wake.set()

    def _failed(self, shard: Shard, what: str, exc: BaseException, backoff: float) -> None:
        self.errors += 1
        log.warning("timer: %s on shard %s failed (%s: %s); retrying in %.1fs", what,
                    shard.label, exc.__class__.__name__, exc, backoff)


async def run(ctx: Context, store: Store | None = None) -> None:
    """Run timer `ctx.index` until `ctx.stopping` is set. Closes the store it opened."""
    async with role_resources(ctx, store=store) as res:
        timer = Timer(ctx, res.store)
        started = time.monotonic()
        log.info("%s started: buckets %s of %d on %d shard(s), tick %.2fs", ctx.name,
                 _ranges(timer.owned), res.store.buckets, len(res.store.shards.shards),
                 timer.tick)
        try:
            await timer.serve()
        finally:
            log.info("%s stopped after %.0fs: moved=%d requeued=%d errors=%d", ctx.name,
                     time.monotonic() - started, timer.moved, timer.requeued, timer.errors)


def _ranges(buckets: Sequence[int]) -> str:
    return ",".join(str(b) for b in buckets) or "-"
