"""One claimed job, from its claim to its outcome: look its topic up, decide whether to
call it (or park it, or keep it as a dead letter uncalled), call it within what is left of
its lease, and write the outcome (ack, retry, or bury) so that a cancelled delivery still
writes it. The rules are in the package's doc (dq/roles/consumer/__init__.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
from redis.exceptions import RedisError

from dq.config import Settings
from dq.errors import DqError
from dq.registry.core import Topic
from dq.registry.retry_policy import policy_of
from dq.registry.topics import TopicCache
from dq.roles.breaker import Breakers
from dq.roles.callback import EXCERPT, ExprCache, Outcome, call
from dq.runtime.context import Context
from dq.storage.store import Claimed, Store

if TYPE_CHECKING:
    from dq.roles.consumer.alerts import Alerts

log = logging.getLogger("dq.consumer")
notify_log = logging.getLogger("dq.notify")

LEASE_SHARE = 0.9  # of the lease a callback may take at most
MIN_CALL = 0.5  # seconds (at most half the callback's share of the lease): with less of
#                the lease left, a job is not called (it is delivered again after the lease)
SHARD_ERRORS = (DqError, RedisError, OSError, asyncio.TimeoutError)


def max_attempts(topic: Topic, settings: Settings) -> int:
    return topic.max_attempts or settings.max_attempts


def retry_delay_ms(attempt: int, unit: float) -> int:
    """Back-off after failed attempt `attempt` (0-based): (2n+1) units."""
    return int((2 * attempt + 1) * unit * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Delivery:
    """Delivers claimed jobs one by one (each in its own task), with the counters of what
    became of them. The consumer's claim loops hand it the jobs they claim."""

    def __init__(self, ctx: Context, store: Store, topics: TopicCache, alerts: Alerts) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = store
        self.topics = topics
        self.alerts = alerts
        self.exprs = ExprCache()
        self.capped: set[str] = set()  # topics whose timeout was cut to fit the lease
        self.lease_ms = int(ctx.settings.lease * 1000)
        self.session: aiohttp.ClientSession | None = None
        self.writes: set[asyncio.Task[Any]] = set()  # final writes still running
        self.breakers = Breakers(store, self.lease_ms)
        self.delivered = self.retried = self.dead = self.failed = self.parked = 0
        self.deferred = 0  # Retry-After waits

    async def _deliver(self, c: Claimed, leased: float) -> None:
        """Deliver `c`, leased (monotonic) no earlier than `leased`."""
        try:
            await self._deliver_one(c, leased)
        finally:
            if c.flow_lease:
                await self._release(c)

    async def _release(self, c: Claimed) -> None:
        """Give back the topic concurrency slot the job took; if that fails, its lease
        running out frees it (requeue_expired.lua)."""
        try:
            await self.store.release(c)
        except SHARD_ERRORS as exc:
            log.warning("%s: could not free the concurrency slot of %s (%s: %s); it is freed "
                        "when its lease runs out", self.ctx.name, c.tid,
                        exc.__class__.__name__, exc)

    async def _deliver_one(self, c: Claimed, leased: float) -> None:
        admitted = await self._admit(c, leased)
        if admitted is None:
            return
        topic, timeout = admitted
        out = await self._call(topic, c, timeout)
        self._notify(c, out)
        await self._record(topic, c, out)
        if topic.breaker_threshold and not out.permanent:
            change = await self.breakers.record(topic, out.ok, out.error)
            if change is not None:
                self.alerts.breaker_changed(topic, change.member)

    async def _topic(self, c: Claimed) -> Topic | None:
        try:
            return await self.topics.get(c.topic)
        except Exception:
            log.exception("%s: topic lookup for %s failed; job parked", self.ctx.name, c.tid)
            return None

    async def _admit(self, c: Claimed, leased: float) -> tuple[Topic, float] | None:
        """The job's topic and how long its call may take; None when it is not called now
        (kept as a dead letter, or parked until its topic or breaker lets it through)."""
        topic = await self._topic(c)
        if c.unreadable:
            await self._shielded(self._bury_unreadable(topic, c))
            return None
        if topic is None or not topic.online:
            log.debug("%s: %s parked: topic %s", self.ctx.name, c.tid,
                      "unknown" if topic is None else "offline")
            await self._park(c)
            return None
        if c.attempt >= max_attempts(topic, self.settings):
            await self._shielded(self._bury_spent(topic, c))
            return None
        if topic.breaker_threshold:
            _probe, wait_ms = await self.breakers.admit(topic)
            if wait_ms:
                log.debug("%s: %s waits %d ms: the breaker of topic %s is open", self.ctx.name,
                          c.tid, wait_ms, topic.topic)
                await self._park(c, wait_ms)
                return None
        timeout = self._timeout(topic, leased)
        if timeout < min(MIN_CALL, self.settings.lease * LEASE_SHARE / 2):
            # The lookup took most of the lease (a registry slow to answer): a call now
            # could still run when the lease ends and the job is handed out again.
            log.warning("%s: %s not called: %.1fs of its lease left; it is delivered again "
                        "after %.0fs", self.ctx.name, c.tid, max(0.0, timeout),
                        self.settings.lease)
            await self._park(c)
            return None
        return topic, timeout

    def _notify(self, c: Claimed, out: Outcome) -> None:
        """The call's line in the notify log."""
        level = logging.INFO if out.ok else logging.WARNING
        if notify_log.isEnabledFor(level):  # spares the extras when the line goes nowhere
            late_ms = max(0, c.claimed_ms - c.due_ms)
            notify_log.log(level, "topic=%s id=%s attempt=%d status=%d ms=%d late_ms=%d%s",
                           c.topic, c.id, c.attempt + 1, out.status, out.ms, late_ms,
                           "" if out.ok else f" error={out.error}",
                           extra={"topic": c.topic, "id": c.id, "attempt": c.attempt + 1,
                                  "status": out.status, "ms": out.ms, "late_ms": late_ms,
                                  "ok": out.ok, "error": out.error})

    async def _record(self, topic: Topic, c: Claimed, out: Outcome) -> None:
        """Write the call's outcome; one that cannot be written leaves the lease to run out."""
        try:
            if out.ok:
                # The ack joins this loop turn's batch before its first await, so it is
                # sent even if this delivery is cancelled now: no shield needed.
                await self.store.ack(c, took_ms=out.ms)
                self.delivered += 1
            else:
                await self._shielded(self._failed(topic, c, out))
        except SHARD_ERRORS as exc:
            self.failed += 1
            log.warning("%s: could not record the outcome of %s (%s: %s); it is delivered "
                        "again after its lease", self.ctx.name, c.tid, exc.__class__.__name__,
                        exc)

    async def _call(self, topic: Topic, c: Claimed, timeout: float) -> Outcome:
        assert self.session is not None
        t0 = time.monotonic()
        try:
            return await call(self.session, self.exprs, topic, c, timeout)
        except Exception as exc:
            log.exception("%s: calling %s for %s failed unexpectedly", self.ctx.name,
                          topic.callback, c.tid)
            return Outcome(False, 0, f"{exc.__class__.__name__}: {exc}", "",
                           int((time.monotonic() - t0) * 1000))

    def _timeout(self, topic: Topic, leased: float) -> float:
        """The topic's timeout, capped below what is left of the lease (taken at `leased`,
        monotonic) so no job is delivered twice at once."""
        cap = self.settings.lease * LEASE_SHARE
        if topic.timeout_ms / 1000 > cap and topic.topic not in self.capped:
            self.capped.add(topic.topic)
            log.warning("topic %s: timeout %d ms is not below the lease (%.1fs); callbacks "
                        "are cut off after %.1fs", topic.topic, topic.timeout_ms,
                        self.settings.lease, cap)
        return min(topic.timeout_ms / 1000, cap - (time.monotonic() - leased))

    async def _shielded(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a final write to completion even if this delivery is cancelled meanwhile."""
        task = asyncio.ensure_future(coro)
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)
        await asyncio.shield(task)

    async def _failed(self, topic: Topic, c: Claimed, out: Outcome) -> None:
        """Retry a failed attempt after its back-off, or keep it as a dead letter (at once
        when no attempt can succeed: the callback network policy refused its address);
        either way the attempt's error stays with the job (the console and API show it)."""
        called = not out.permanent  # a refused address was never sent a request
        error = {"status": out.status, "error": out.error, "reply": out.reply[:EXCERPT],
                 "attempts": c.attempt + called, "at": _now_ms()}
        if out.retry_after is not None:
            # The receiver said when to come back: no attempt is used (the same attempt
            # number is sent then), however often it says so.
            wait = min(max(1.0, out.retry_after), self.settings.retry_after_max)
            error.update(attempts=c.attempt, deferred=True)
            await self.store.retry(c, int(wait * 1000), error=error, took_ms=out.ms,
                                   counted=False)
            self.deferred += 1
            return
        if called and c.attempt + 1 < max_attempts(topic, self.settings):
            wait_ms = policy_of(topic.retry_policy).delay_ms(c.attempt, self.settings.retry_unit)
            await self.store.retry(c, wait_ms, error=error, took_ms=out.ms)
            self.retried += 1
            return
        if await self.store.bury(c, error, called=called, took_ms=out.ms):
            self.dead += 1
            log.warning("%s: %s is a dead letter after %d attempts: %s", self.ctx.name, c.tid,
                        error["attempts"], out.error)
            self.alerts.dead_letter(topic, c, error)

    async def _park(self, c: Claimed, delay_ms: int | None = None) -> None:
        """Look at a job that was not called again after `delay_ms` (by default `lease`
        seconds), without counting an attempt. If the write fails, the lease runs out
        instead (and counts one)."""
        self.parked += 1
        try:
            await self._shielded(self.store.park(c, delay_ms or self.lease_ms))
        except SHARD_ERRORS as exc:
            log.warning("%s: could not park %s (%s: %s); it is delivered again after its "
                        "lease", self.ctx.name, c.tid, exc.__class__.__name__, exc)

    async def _bury_spent(self, topic: Topic, c: Claimed) -> None:
        """A job claimed with its attempts used up, the last one cut off (its consumer died
        or hung mid-call and the lease ran out, which counts as an attempt): kept as a
        dead letter without calling it again, so a job that kills its consumer cannot loop."""
        most = max_attempts(topic, self.settings)
        error = {"status": 0, "error": f"not called again: it has had {c.attempt} deliveries "
                 f"and max_attempts is {most}; the last ended with no outcome recorded (its "
                 "consumer stopped or hung and its lease ran out) or max_attempts was lowered "
                 "since. Redrive it to call it again", "reply": "", "attempts": c.attempt,
                 "at": _now_ms()}
        if await self._bury_uncalled(topic, c, error, ""):
            log.warning("%s: %s is a dead letter: %d deliveries, the last cut off by an "
                        "expired lease", self.ctx.name, c.tid, c.attempt)

    async def _bury_unreadable(self, topic: Topic | None, c: Claimed) -> None:
        """A job whose stored form cannot be read (written by hand, or damaged): kept as a
        dead letter without a call, with why, and its topic's owners told."""
        error = {"status": 0, "error": f"the stored job cannot be read ({c.unreadable}); it "
                 "was not called: delete it, or add it again", "reply": "",
                 "attempts": c.attempt, "at": _now_ms()}
        if await self._bury_uncalled(topic, c, error, "unreadable job "):
            log.error("%s: %s cannot be read (%s); kept as a dead letter", self.ctx.name,
                      c.tid, c.unreadable)

    async def _bury_uncalled(self, topic: Topic | None, c: Claimed, error: dict[str, Any],
                             kind: str) -> bool:
        """Keep `c` as a dead letter without calling it, and mail its topic's alert; True
        when it was (the caller says why). `kind` names such jobs in the line that says it
        could not be kept, which leaves it to be looked at again after its lease."""
        try:
            buried = await self.store.bury(c, error, called=False)
        except SHARD_ERRORS as exc:
            self.failed += 1
            log.warning("%s: could not keep %s%s as a dead letter (%s); it is looked at "
                        "again after its lease", self.ctx.name, kind, c.tid, exc)
            return False
        if buried:
            self.dead += 1
            if topic is not None:
                self.alerts.dead_letter(topic, c, error)
        return buried
