"""Consumer role: claim ready jobs, call their topic's callback, then ack, retry or bury.

Per shard one claim loop leases up to the free slots (`settings.concurrency` callbacks in
flight per consumer process; at most the shard's share of them at a time, so a claim on a
shard that hangs leaves the others theirs), trying the ready lists in a weighted random
priority order, and backs off from 5 to 50 ms while nothing is ready. Each claimed job runs
as its own task:

- success (see dq/roles/callback.py for the request, its signature and what counts as success):
  ack; the job is gone.
- failure with attempts left (attempt n, 0-based, of max_attempts = the topic's, else the
  settings'): retry after the wait the topic's retry_policy gives (dq/registry/retry_policy.py; by
  default (2n+1) retry units).
- a 429 or 503 reply with Retry-After: the job waits that long (at least 1 s, at most
  `retry_after_max`), rescheduled without counting an attempt (the call is counted in the
  statistics as a failed one), its error shown meanwhile.
- a topic with a circuit breaker (dq/roles/breaker.py): while it is open, claimed jobs are parked
  until the cool-off ends, not called and not counted; every outcome is told to it, and an
  opening or closing is mailed to the topic's emails (owed until sent, like dead letters).
- failure on the last attempt: bury as a dead letter with the last status, error and reply
  excerpt, and mail the topic's alert addresses (in the background). The mail is owed
  until sent (Alerts.owed_alerts): one its consumer did not get out (it died or was stopped
  first, or the mail server failed) is mailed by consumer 0's sweep, for up to 24 hours.
- flow control (a topic's rate_limit, concurrency and paused): the claim script takes
  each flow-controlled topic's share of the limits for the shard (dq/roles/flow.py, from the
  cached registry), and holds back the jobs it may not call yet in the topic's held list
  on the shard (dq/storage/lua/claim.lua), so they hold up no other topic. A job that took a
  concurrency slot gives it back once its outcome is written (release.lua), or when its
  lease runs out (requeue_expired.lua).
- a topic that is unknown or offline: the job is parked, not called, not counted as an
  attempt and not lost: it goes back to its delay bucket (dq/storage/lua/park.lua), due again in
  `lease` seconds, so it is looked at every `lease` seconds until the topic is online (or
  the job is deleted).
- anything unexpected while calling counts as a failed attempt; a write that fails leaves
  the lease to expire, so the job is delivered again (at-least-once).
- a delivery cut off (its consumer died or hung, so its lease ran out) counts as an
  attempt: the timer that requeues it adds one (dq/storage/lua/requeue_expired.lua), the next
  call says `X-Dq-Attempt: 2`, and a job claimed with all its attempts used that way is
  kept as a dead letter without another call (a job whose call kills its consumer cannot
  loop). max_attempts thus caps the calls started, whatever became of them.
- a callback never runs longer than 90% of the lease (a topic timeout beyond that is cut,
  with one warning), so a job is not delivered a second time while its first call runs.

Stopping: when `ctx.stopping` is set the claim loops stop, callbacks in flight get
`settings.grace` seconds to finish, the rest are cancelled (their leases expire and timers
requeue them). A final write survives that cancellation: an ack is queued in the loop
turn's batched ack call before the delivery first waits, and retry/bury are shielded.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import logging
import random
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from dq.config import Settings
from dq.errors import DqError
from dq.registry.core import Registry, Topic
from dq.registry.retry_policy import policy_of
from dq.registry.topics import TopicCache
from dq.roles.alert import breaker_mail, dead_letter_mail, send_alert
from dq.roles.breaker import Breakers
from dq.roles.callback import EXCERPT, ExprCache, Outcome, call, open_session
from dq.roles.flow import shard_limits
from dq.roles.netpolicy import CallbackPolicy
from dq.runtime.context import Context
from dq.runtime.loops import Backoff, pause
from dq.runtime.resources import RoleResources, role_resources
from dq.sharding.shards import Shard
from dq.storage.store import Claimed, FlowLimit, Store, split_tid

log = logging.getLogger("dq.consumer")
notify_log = logging.getLogger("dq.notify")

IDLE_MIN = 0.005
IDLE_MAX = 0.05
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0
DOWN_WAIT = 0.25  # how often a claim loop looks again at a shard that is down
LEASE_SHARE = 0.9  # of the lease a callback may take at most
MIN_CALL = 0.5  # seconds (at most half the callback's share of the lease): with less of
#                the lease left, a job is not called (it is delivered again after the lease)
ALERT_WAIT = 12.0  # at stop, how long mails still being sent may take
ALERT_SWEEP = 30.0  # seconds between consumer 0's looks for alert mails still owed
ALERT_GIVE_UP_MS = 24 * 3600 * 1000  # an alert not mailed within this is dropped
HELD_LOOK = 1.0  # seconds between a claim loop's looks at which topics have held jobs
SHARD_ERRORS = (DqError, RedisError, OSError, asyncio.TimeoutError)
_RNG = random.Random()


def _orders(left: tuple[tuple[int, int], ...]) -> list[tuple[float, tuple[int, ...]]]:
    """Every order of the priorities in `left` ((priority, weight) pairs) with its odds
    when the first is drawn by weight, then the next by weight among the rest, and
    zero-weight priorities come last."""
    total = sum(w for _, w in left)
    if total <= 0:
        return [(1.0, tuple(p for p, _ in left))]
    out = []
    for i, (p, w) in enumerate(left):
        if w > 0:
            for odds, rest in _orders(left[:i] + left[i + 1:]):
                out.append((w / total * odds, (p, *rest)))
    return out


@functools.lru_cache(maxsize=32)
def _order_table(weights: tuple[int, ...]) -> tuple[list[float], list[list[int]]]:
    """Cumulative odds and the orders they pick, for one setting of the weights."""
    left = tuple((p, max(0, int(w))) for p, w in zip((1, 2, 3), weights, strict=False))
    cum, orders, acc = [], [], 0.0
    for odds, order in _orders(left):
        acc += odds
        cum.append(acc)
        orders.append(list(order))
    return cum, orders


def priority_order(weights: Sequence[int], rng: random.Random | None = None) -> list[int]:
    """Priorities 1..3 in a weighted random order: the first drawn by weight, then the next
    by weight among the rest; zero-weight priorities come last. (One random number and a
    table per weights: this runs before every claim.)"""
    cum, orders = _order_table(tuple(weights))
    i = bisect.bisect_right(cum, (rng or _RNG).random() * cum[-1])
    return list(orders[min(i, len(orders) - 1)])


def max_attempts(topic: Topic, settings: Settings) -> int:
    return topic.max_attempts or settings.max_attempts


def retry_delay_ms(attempt: int, unit: float) -> int:
    """Back-off after failed attempt `attempt` (0-based): (2n+1) units."""
    return int((2 * attempt + 1) * unit * 1000)


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


class Consumer:
    """One consumer process's work over all shards, with its counters."""

    def __init__(self, ctx: Context, store: Store, topics: TopicCache,
                 registry: Registry | None, *, resources: RoleResources | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = store
        self.topics = topics
        # the registry, opened when first needed if none was given (role_resources closes it)
        self.resources = resources or RoleResources(ctx.settings, store=store,
                                                    registry=registry)
        self.exprs = ExprCache()
        self.capped: set[str] = set()  # topics whose timeout was cut to fit the lease
        self.slots = Slots(ctx.settings.concurrency)
        self.lease_ms = int(ctx.settings.lease * 1000)
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writes: set[asyncio.Task[Any]] = set()
        self.alerts: set[asyncio.Task[None]] = set()
        self.breakers = Breakers(store, self.lease_ms)
        self.delivered = self.retried = self.dead = self.failed = self.parked = 0
        # Per shard: (topics generation, held topics, the flow limits built from them),
        # and when its held topics were last looked at (monotonic).
        self._flow: dict[str, tuple[int, frozenset[str], list[FlowLimit]]] = {}
        self._held_seen: dict[str, float] = {}
        self.deferred = 0  # Retry-After waits

    # the loop ---------------------------------------------------------------------------
    async def serve(self) -> None:
        loops: list[asyncio.Task[None]] = []
        shard_urls = [s.url for s in self.store.shards.shards]
        policy = await asyncio.to_thread(CallbackPolicy.build, self.settings, shard_urls)
        async with open_session(self.settings.concurrency, policy) as session:
            self.session = session
            try:
                loops = [asyncio.create_task(self._claim_loop(s), name=f"claim:{s.name}")
                         for s in self.store.shards.shards]
                if self.ctx.index == 0:
                    loops.append(asyncio.create_task(self._alert_sweep(), name="alerts"))
                await self.ctx.stopping.wait()
                self.slots.freed.set()  # wake claim loops waiting for a slot
                await asyncio.gather(*loops)
                await self._drain()
            finally:
                # Reached early only when this task is cancelled (a hard kill): no drain.
                for t in (*loops, *self.tasks):
                    t.cancel()
                await asyncio.gather(*loops, *self.tasks, *self.writes, return_exceptions=True)
        await self._wait_alerts()

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

    async def _wait_alerts(self) -> None:
        if self.alerts:
            _done, pending = await asyncio.wait(set(self.alerts), timeout=ALERT_WAIT)
            for t in pending:
                t.cancel()

    async def _claim_loop(self, shard: Shard) -> None:
        idle, backoff = Backoff(IDLE_MIN, IDLE_MAX), Backoff(BACKOFF_MIN, BACKOFF_MAX)
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
                if isinstance(exc, SHARD_ERRORS):
                    log.warning("%s: claim on shard %s failed (%s: %s); retrying in %.1fs",
                                self.ctx.name, shard.label, exc.__class__.__name__, exc,
                                backoff.delay)
                else:
                    log.exception("%s: claim on shard %s failed", self.ctx.name, shard.name)
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

    # one job ----------------------------------------------------------------------------
    async def _deliver(self, c: Claimed, leased: float) -> None:
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
        try:
            topic = await self.topics.get(c.topic)
        except Exception:
            log.exception("%s: topic lookup for %s failed; job parked", self.ctx.name, c.tid)
            topic = None
        if c.unreadable:
            await self._shielded(self._bury_unreadable(topic, c))
            return
        if topic is None or not topic.online:
            log.debug("%s: %s parked: topic %s", self.ctx.name, c.tid,
                      "unknown" if topic is None else "offline")
            await self._park(c)
            return
        if c.attempt >= max_attempts(topic, self.settings):
            await self._shielded(self._bury_spent(topic, c))
            return
        if topic.breaker_threshold:
            _probe, wait_ms = await self.breakers.admit(topic)
            if wait_ms:
                log.debug("%s: %s waits %d ms: the breaker of topic %s is open", self.ctx.name,
                          c.tid, wait_ms, topic.topic)
                await self._park(c, wait_ms)
                return
        timeout = self._timeout(topic, leased)
        if timeout < min(MIN_CALL, self.settings.lease * LEASE_SHARE / 2):
            # The lookup took most of the lease (a registry slow to answer): a call now
            # could still run when the lease ends and the job is handed out again.
            log.warning("%s: %s not called: %.1fs of its lease left; it is delivered again "
                        "after %.0fs", self.ctx.name, c.tid, max(0.0, timeout),
                        self.settings.lease)
            await self._park(c)
            return
        out = await self._call(topic, c, timeout)
        level = logging.INFO if out.ok else logging.WARNING
        if notify_log.isEnabledFor(level):  # spares the extras when the line goes nowhere
            late_ms = max(0, c.claimed_ms - c.due_ms)
            notify_log.log(level, "topic=%s id=%s attempt=%d status=%d ms=%d late_ms=%d%s",
                           c.topic, c.id, c.attempt + 1, out.status, out.ms, late_ms,
                           "" if out.ok else f" error={out.error}",
                           extra={"topic": c.topic, "id": c.id, "attempt": c.attempt + 1,
                                  "status": out.status, "ms": out.ms, "late_ms": late_ms,
                                  "ok": out.ok, "error": out.error})
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
        if topic.breaker_threshold and not out.permanent:
            change = await self.breakers.record(topic, out.ok, out.error)
            if change is not None:
                self._breaker_mail_later(topic, change.member)

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

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
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
                 "attempts": c.attempt + called, "at": int(time.time() * 1000)}
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
            self._alert_later(topic, c, error)

    async def _park(self, c: Claimed, delay_ms: int | None = None) -> None:
        """Look at a job that was not called again after `delay_ms` (by default `lease`
        seconds), without counting an attempt. If the write fails, the lease runs out
        instead (and counts one)."""
        self.parked += 1
        try:
            await self._shielded(self._park_write(c, delay_ms or self.lease_ms))
        except SHARD_ERRORS as exc:
            log.warning("%s: could not park %s (%s: %s); it is delivered again after its "
                        "lease", self.ctx.name, c.tid, exc.__class__.__name__, exc)

    async def _park_write(self, c: Claimed, delay_ms: int) -> None:
        await self.store.park(c, delay_ms)

    async def _bury_spent(self, topic: Topic, c: Claimed) -> None:
        """A job claimed with its attempts used up, the last one cut off (its consumer died
        or hung mid-call and the lease ran out, which counts as an attempt): kept as a
        dead letter without calling it again, so a job that kills its consumer cannot loop."""
        most = max_attempts(topic, self.settings)
        error = {"status": 0, "error": f"not called again: it has had {c.attempt} deliveries "
                 f"and max_attempts is {most}; the last ended with no outcome recorded (its "
                 "consumer stopped or hung and its lease ran out) or max_attempts was lowered "
                 "since. Redrive it to call it again", "reply": "", "attempts": c.attempt,
                 "at": int(time.time() * 1000)}
        try:
            buried = await self.store.bury(c, error, called=False)
        except SHARD_ERRORS as exc:
            self.failed += 1
            log.warning("%s: could not keep %s as a dead letter (%s); it is looked at again "
                        "after its lease", self.ctx.name, c.tid, exc)
            return
        if buried:
            self.dead += 1
            log.warning("%s: %s is a dead letter: %d deliveries, the last cut off by an "
                        "expired lease", self.ctx.name, c.tid, c.attempt)
            self._alert_later(topic, c, error)

    async def _bury_unreadable(self, topic: Topic | None, c: Claimed) -> None:
        """A job whose stored form cannot be read (written by hand, or damaged): kept as a
        dead letter without a call, with why, and its topic's owners told."""
        error = {"status": 0, "error": f"the stored job cannot be read ({c.unreadable}); it "
                 "was not called: delete it, or add it again", "reply": "",
                 "attempts": c.attempt, "at": int(time.time() * 1000)}
        try:
            buried = await self.store.bury(c, error, called=False)
        except SHARD_ERRORS as exc:
            self.failed += 1
            log.warning("%s: could not keep unreadable job %s as a dead letter (%s); it is "
                        "looked at again after its lease", self.ctx.name, c.tid, exc)
            return
        if buried:
            self.dead += 1
            log.error("%s: %s cannot be read (%s); kept as a dead letter", self.ctx.name,
                      c.tid, c.unreadable)
            if topic is not None:
                self._alert_later(topic, c, error)

    def _alert_later(self, topic: Topic, c: Claimed, error: dict[str, Any]) -> None:
        task = asyncio.create_task(self._alert(topic, c, error))
        self.alerts.add(task)
        task.add_done_callback(self.alerts.discard)

    async def _alert(self, topic: Topic, c: Claimed, error: dict[str, Any]) -> None:
        """Mail a dead letter's alert; once mailed (or with nobody to mail) it is no longer
        owed. One that fails stays owed: consumer 0's sweep tries it again later."""
        try:
            registry = await self.resources.registry_now()
            conf = await asyncio.to_thread(registry.alert)
            subject, text = dead_letter_mail(topic, c, error)
            sent = await send_alert(conf, topic.emails, subject, text)
            if sent or not (conf.host and any(a.strip() for a in topic.emails)):
                await self.store.alerts.alert_done(c.shard, c.tid)
        except Exception:
            log.exception("%s: alert for dead letter %s failed", self.ctx.name, c.tid)

    def _breaker_mail_later(self, topic: Topic, member: str) -> None:
        task = asyncio.create_task(self._breaker_mail(topic, member))
        self.alerts.add(task)
        task.add_done_callback(self.alerts.discard)

    async def _breaker_mail(self, topic: Topic, member: str, shard: Shard | None = None) -> None:
        """Mail a breaker's opening or closing; once mailed (or with nobody to mail) it is
        no longer owed. One that fails stays owed: consumer 0's sweep tries it again."""
        try:
            registry = await self.resources.registry_now()
            conf = await asyncio.to_thread(registry.alert)
            subject, text = breaker_mail(topic, json.loads(member))
            sent = await send_alert(conf, topic.emails, subject, text)
            if sent or not (conf.host and any(a.strip() for a in topic.emails)):
                await self.store.alerts.breaker_mail_done(topic.topic, member, shard)
        except Exception:
            log.exception("%s: breaker mail for topic %s failed", self.ctx.name, topic.topic)

    async def _owed_breaker_mails(self, shard: Shard) -> None:
        for member in await self.store.alerts.owed_breaker_mails(shard):
            try:
                event = json.loads(member)
                key, at = str(event["topic"]), int(event["at"])
            except (ValueError, KeyError, TypeError):
                await self.store.alerts.breaker_mail_done("", member, shard)  # not ours to read
                continue
            topic = await self.topics.get(key)
            if topic is None or time.time() * 1000 - at > ALERT_GIVE_UP_MS:
                await self.store.alerts.breaker_mail_done(key, member, shard)
                continue
            await self._breaker_mail(topic, member, shard)

    async def _alert_sweep(self) -> None:
        """Consumer 0 mails, every ALERT_SWEEP seconds, the alerts still owed: their
        consumer died or was stopped before mailing, or the mail server failed."""
        while not self.ctx.stopping.is_set():
            await pause(self.ctx.stopping, ALERT_SWEEP)
            for shard in self.store.shards.shards:
                if self.ctx.stopping.is_set() or not shard.up:
                    continue
                try:
                    for tid in await self.store.alerts.owed_alerts(shard):
                        await self._owed_alert(shard, tid)
                    await self._owed_breaker_mails(shard)
                except SHARD_ERRORS as exc:
                    log.warning("%s: looking for alerts owed on shard %s failed (%s: %s)",
                                self.ctx.name, shard.label, exc.__class__.__name__, exc)

    async def _owed_alert(self, shard: Shard, tid: str) -> None:
        topic_key, job_id = split_tid(tid)
        info = await self.store.lookup(topic_key, job_id)
        if info is None or info.state != "dead" or info.shard != shard.name:
            await self.store.alerts.alert_done(shard, tid)  # redriven or deleted since
            return
        error = info.error or {}
        at = error.get("at")
        if type(at) is int and time.time() * 1000 - at > ALERT_GIVE_UP_MS:
            log.warning("%s: the alert for dead letter %s could not be mailed within %d h; "
                        "giving up", self.ctx.name, tid, ALERT_GIVE_UP_MS // 3_600_000)
            await self.store.alerts.alert_done(shard, tid)
            return
        topic = await self.topics.get(topic_key)
        if topic is None:
            await self.store.alerts.alert_done(shard, tid)  # its topic is gone: nobody to tell
            return
        await self._alert(topic, Claimed(
            shard=shard, tid=tid, topic=topic_key, id=job_id, version="",
            priority=info.priority, attempt=max(0, info.attempt - 1), due_ms=info.due_ms,
            set_ms=0, body=info.body, claimed_ms=0, unreadable=info.unreadable), error)


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
