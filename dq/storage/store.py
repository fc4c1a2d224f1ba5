"""The job state machine: the Python face of dq/storage/lua/*.lua.

Every state change of a job is one Lua script on the job's shard (see DESIGN.md section
2); `Store` builds each transition's keys (dq/storage/keys.py) and arguments, routes each
tid to its shard and decodes what the scripts return. Its parts, each an object of the
store: `keys`, `batch` (write batching, dq/storage/batch.py), `fence` (the add deadline,
dq/storage/fence.py), `stats` (counters and histograms, dq/storage/stats.py),
`maintenance` (dq/storage/maintenance.py), `alerts` (owed mails and breakers,
dq/storage/alerts.py) and `original` (php-delayqueue's layout, dq/storage/original.py).
The stored form of a job is dq/storage/payload.py's.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Collection, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from dq import fastjson
from dq.errors import UNAVAILABLE, DqError
from dq.sharding.refusals import ShardRefused
from dq.sharding.shards import Shard, ShardSet
from dq.storage import alerts, payload
from dq.storage.alerts import Alerts
from dq.storage.batch import ADD_BATCH, AddDone, AddJob, Batcher, Done, Part
from dq.storage.clock import Clock
from dq.storage.fence import Fence, GivenUp
from dq.storage.jobs import AddResult, Claimed, FlowLimit, JobInfo, JobState, make_tid, split_tid
from dq.storage.keys import Keys
from dq.storage.maintenance import Maintenance
from dq.storage.original import Original
from dq.storage.payload import BadPayload, Stored, new_version
from dq.storage.stats import MINUTE_TTL, Stats, observe

# Names callers take from here (the job types are dq/storage/jobs.py's).
__all__ = ["ADD_BATCH", "AddDone", "AddJob", "AddResult", "Claimed", "Done", "FlowLimit",
           "GivenUp", "JobInfo", "JobState", "Part", "Store", "make_tid", "split_tid"]

# After this process writes a guest to a shard, its adds evict older copies there for this
# long (ms) even before the checker's record says the shard holds guests.
GUESTS_FRESH_MS = 10_000
# Most ready entries one claim moves to held lists (their topic may not be called now):
# a long run of a paused topic's jobs is gone through in several short calls.
HOLD_BATCH = 1000


class Store:
    """Job operations over a ShardSet, with keys under one prefix."""

    def __init__(self, shards: ShardSet, *, prefix: str = "dq:", buckets: int = 8,
                 zone: ZoneInfo | None = None, orig_prefix: str = "",
                 add_timeout: float = 0.0) -> None:
        self.shards = shards
        self.prefix = prefix
        self.buckets = buckets
        self.zone = zone
        self.orig_prefix = orig_prefix
        self.keys = Keys(prefix, buckets, orig_prefix)
        self.clock = Clock(zone)
        self.batch = Batcher(self)
        # Adds answered within add_timeout even when their shard hangs (dq/storage/fence.py).
        self.fence = Fence(self, add_timeout)
        self.stats = Stats(self)
        self.maintenance = Maintenance(self)
        self.alerts = Alerts(self)
        self.original = Original(self)

    def add_job(self, topic: str, job_id: str, body: dict[str, Any], *, priority: int = 2,
                due_ms: int | None = None, delay_ms: int | None = None,
                exclude: Collection[str] = ()) -> tuple[Shard, AddJob]:
        """The shard an add goes to and its part of an add script call. The shard is the
        tid's owner, else the next healthy one; shards named in `exclude` (they just
        failed this add) are passed over."""
        k = self.keys
        tid = f"{topic}:{job_id}"  # make_tid, spelled out: this runs once per add
        now_ms = int(time.time() * 1000)
        if due_ms is None:
            delay_ms = max(0, delay_ms or 0)
            est_due = now_ms + delay_ms
        else:
            est_due = due_ms
        if "notify_time" in body:  # the original overwrites it (kept in its place)
            body = {**body, "notify_time": self.clock.fmt_time(est_due)}
        text = payload.encode(new_version(), priority, 0, est_due, now_ms, fastjson.dumps(body))
        b = k.bucket(tid)
        shard, owned = self.shards.route(tid, exclude)
        if owned:
            # The add replaces the job. While other shards hold guests (the checker's
            # record says which, or this process wrote one there lately), an older copy of
            # it may be one of them: it must go too, or it would fire as well (or be moved
            # home over this one once delivered).
            for other in self.shards.shards:
                if other is not shard and (other.has_guests or now_ms < other.guests_until):
                    self.batch.evict(other, ((k.delay[b],), (tid,)))
        else:
            shard.guests_until = now_ms + GUESTS_FRESH_MS
        return shard, ((k.delay[b], k.wake[b], k.stat(topic)),
                       (tid, text, "" if due_ms is None else due_ms, delay_ms or 0,
                        0 if owned else 1))

    async def add_once(self, shard: Shard, job: AddJob, end: float = math.inf) -> Any:
        """One add on `shard` on its own, within add_timeout and by `end` (monotonic; the
        add's budget, dq/storage/fence.py): its reply values, or DqError "unavailable"."""
        return await self.fence.add_once(shard, job, end)

    def add_nowait(self, shard: Shard, job: AddJob, done: AddDone) -> None:
        """Queue an add; `done` gets (replaced 0|1, due ms). See `Batcher.queue`."""
        self.batch.queue("add", shard, job, done)

    async def add(self, topic: str, job_id: str, body: dict[str, Any], *, priority: int = 2,
                  due_ms: int | None = None, delay_ms: int | None = None) -> AddResult:
        """Store or replace a job; it falls due at due_ms, else delay_ms from now. When the
        chosen shard is unavailable, the add is tried once more on the next healthy one."""
        end = self.fence.budget_end(time.monotonic())
        shard, job = self.add_job(topic, job_id, body, priority=priority, due_ms=due_ms,
                                  delay_ms=delay_ms)
        try:
            try:
                res = await self.batch.call("add", shard, job, end)
            except DqError as exc:
                if exc.err != UNAVAILABLE or isinstance(exc, ShardRefused):
                    raise
                failed = shard
                shard, job = self.add_job(topic, job_id, body, priority=priority,
                                          due_ms=due_ms, delay_ms=delay_ms,
                                          exclude=(failed.name,))
                if shard is failed:
                    raise
                res = await self.add_once(shard, job, self.fence.next_end(end))
        except ShardRefused as exc:
            raise exc.for_add() from None
        return AddResult(replaced=bool(res[0]), due_ms=int(res[1]), shard=shard.name)

    async def _find(self, tid: str) -> tuple[Shard, bytes] | None:
        """The shard holding tid and its payload: the owner first, then every other shard."""
        order = self.shards.order(tid)
        failed: list[BaseException] = []
        try:
            raw = await order[0].call("HGET", self.keys.jobs, tid)
            if raw is not None:
                return order[0], raw
        except DqError as exc:
            failed.append(exc)
        rest = order[1:]
        if rest:
            found = await asyncio.gather(*(s.call("HGET", self.keys.jobs, tid) for s in rest),
                                         return_exceptions=True)
            for shard, raw in zip(rest, found, strict=True):
                if isinstance(raw, BaseException):
                    failed.append(raw)
                elif raw is not None:
                    return shard, raw
        if failed:
            raise DqError(UNAVAILABLE, f"job {tid} not found on the reachable shards and "
                          f"{len(failed)} shard(s) did not answer; retry shortly")
        return None

    async def get(self, topic: str, job_id: str) -> dict[str, Any] | None:
        """The job's body (with notify_time and dq_set_time), or None."""
        found = await self._find(make_tid(topic, job_id))
        if found is None:
            return await self.original.body(make_tid(topic, job_id))
        return self.clock.full_body(payload.readable(make_tid(topic, job_id), found[1]))

    async def delete(self, topic: str, job_id: str) -> bool:
        """Remove the job from every shard that has it; True when one was removed."""
        k = self.keys
        tid = make_tid(topic, job_id)
        b = k.bucket(tid)
        keys = (k.jobs, k.delay[b], k.inflight, k.dead, k.dead_err,
                k.stat(topic), k.orig_jobs or k.jobs)
        args = (tid, self.clock.day())
        # Every shard: a copy written to another shard while the owner was down must not
        # survive a delete and fire later. The other shards first, then the owner: a guest
        # moving home meanwhile (take, land, drop; see dq/storage/guests.py) is then caught on one
        # side or the other, where deleting everywhere at once could miss it on both.
        owner, *others = self.shards.order(tid)
        first = await asyncio.gather(*(s.script("delete", keys, args) for s in others),
                                     return_exceptions=True)
        last = await asyncio.gather(owner.script("delete", keys, args), return_exceptions=True)
        results = [*first, *last]
        deleted = any(r is not None and not isinstance(r, BaseException) and bool(r)
                      for r in results)
        failed = sum(isinstance(r, BaseException) for r in results)
        if not deleted and failed:
            raise DqError(UNAVAILABLE, f"job {tid} not found on the reachable shards and "
                          f"{failed} shard(s) did not answer; retry shortly")
        return deleted

    async def lookup(self, topic: str, job_id: str) -> JobInfo | None:
        """A job's state for the console (not a hot path)."""
        k = self.keys
        tid = make_tid(topic, job_id)
        found = await self._find(tid)
        if found is None:
            return None
        shard, raw = found
        try:
            data = payload.decode(raw)
            body = self.clock.full_body(data)
            unreadable = ""
        except BadPayload as exc:  # shown (with why), so that it can be deleted
            data = Stored(payload.version_of(raw), 2, 0, 0, 0, {})
            body, unreadable = {}, f"the stored job cannot be read: {exc}"
        b = k.bucket(tid)
        delay_score, inflight, dead, err = await asyncio.gather(
            shard.call("ZSCORE", k.delay[b], tid),
            shard.call("ZSCORE", k.inflight, tid),
            shard.call("ZSCORE", k.dead, tid),
            shard.call("HGET", k.dead_err, tid),
        )
        due = data.due_ms
        if dead is not None:
            state = JobState.DEAD
        elif inflight is not None:
            state = JobState.INFLIGHT
        elif delay_score is not None:
            state, due = JobState.DELAYED, int(float(delay_score))
        else:
            state = JobState.READY
        error = json.loads(err) if err else None
        deferred = isinstance(error, dict) and error.get("deferred") is True
        if state != JobState.DEAD and data.attempt == 0 and not deferred:
            # A job with no failed attempt has no last error: one left by an earlier job of
            # this id (moved away to its owner shard as a guest) is not its own.
            error = None
        if unreadable and error is None:
            error = {"error": unreadable}
        attempt = data.attempt  # failed calls before the next (or the current) one
        if state == JobState.DEAD and isinstance(error, dict) \
                and type(error.get("attempts")) is int:
            attempt = error["attempts"]  # the last call failed too
        return JobInfo(shard=shard.name, topic=topic, id=job_id, state=state, due_ms=due,
                       attempt=attempt, priority=data.priority, body=body, error=error,
                       unreadable=unreadable)

    async def move_due(self, shard: Shard, buckets: Sequence[int],
                       limit: int = 1000) -> tuple[int, int | None, int]:
        """Move due jobs of these buckets to the ready lists.

        Returns (moved, next due ms or None, shard now ms)."""
        k = self.keys
        keys = (k.jobs, *k.ready, *(k.delay[b] for b in buckets))
        moved, nxt, now = await shard.script("move_due", keys, (limit,))
        return int(moved), (None if int(nxt) < 0 else int(nxt)), int(now)

    async def claim(self, shard: Shard, n: int, order: Sequence[int], lease_ms: int,
                    flow: Sequence[FlowLimit] = ()) -> list[Claimed]:
        """Lease up to n ready jobs, trying the ready lists in `order` (priorities 1..3).
        The jobs of the topics in `flow` are called only as their limits on this shard
        allow; the others wait in their topic's held list (dq/storage/lua/claim.lua)."""
        k = self.keys
        keys: tuple[str, ...] = (k.jobs, k.inflight, k.flow, k.flow_lease,
                                 k.held_set, *(k.ready[p - 1] for p in order))
        args: tuple[Any, ...] = (n, lease_ms, len(order), HOLD_BATCH)
        counted: set[str] = set()
        if flow:
            keys += tuple(k.held(f.topic) for f in flow)
            for f in flow:
                args += (f.topic, f.rate, f.burst, f.concurrency, 1 if f.paused else 0)
                if f.concurrency > 0 and not f.paused:
                    counted.add(f.topic)
        flat = await shard.script("claim", keys, args)
        now = int(flat[-1])
        out = []
        for i in range(0, len(flat) - 1, 2):
            tid = flat[i].decode()
            topic, job_id = split_tid(tid)
            try:
                data = payload.decode(flat[i + 1])
            except BadPayload as exc:
                # Leased with the others: handed out too (the consumer buries it), so it
                # cannot hold the batch's good jobs back.
                out.append(Claimed(
                    shard=shard, tid=tid, topic=topic, id=job_id,
                    version=payload.version_of(flat[i + 1]), priority=2, attempt=0, due_ms=now,
                    set_ms=now, body={}, claimed_ms=now, unreadable=str(exc)))
                continue
            out.append(Claimed(
                shard=shard, tid=tid, topic=topic, id=job_id, version=data.version,
                priority=data.priority, attempt=data.attempt, due_ms=data.due_ms or now,
                set_ms=data.set_ms or now, body=self.clock.full_body(data), claimed_ms=now,
                flow_lease=now + lease_ms if topic in counted else 0,
            ))
        return out

    async def release(self, c: Claimed) -> bool:
        """Free the concurrency slot a delivered job took (`flow_lease` set), unless its
        lease ran out first and requeue_expired freed it. False when nothing was freed."""
        if not c.flow_lease:
            return False
        keys = (self.keys.flow, self.keys.flow_lease)
        return bool(await c.shard.script("release", keys, (c.tid, c.flow_lease)))

    async def ack(self, c: Claimed, *, took_ms: int | None = None) -> bool:
        """Delete a delivered job; `took_ms` (the call's duration) feeds the histograms."""
        obs = observe(c, took_ms)
        part = ((self.keys.stat(c.topic), self.keys.hist(c.topic)),
                (c.tid, c.version, len(obs) // 2, *obs))
        res = await self.batch.call("ack", c.shard, part)
        return bool(res[0])

    async def retry(self, c: Claimed, delay_ms: int, *, error: dict[str, Any] | None = None,
                    took_ms: int | None = None, counted: bool = True) -> bool:
        """Reschedule after a failed attempt, keeping its `error` as the job's last error
        (`lookup` shows it); False when the job changed meanwhile. As the original did, the
        body's notify_time becomes the retry's due time and its exp_notify_nums counts the
        failed attempts so far. Not `counted` (the receiver asked to wait: Retry-After),
        the call is counted in the statistics but uses no attempt."""
        k = self.keys
        b = k.bucket(c.tid)
        due_ms = int(time.time() * 1000) + delay_ms
        body = {**c.body, "notify_time": self.clock.fmt_time(due_ms)}
        if counted:
            failed = c.body.get("exp_notify_nums")
            body["exp_notify_nums"] = failed + 1 if type(failed) is int else 1
        text = payload.encode(version=new_version(), priority=c.priority, due_ms=due_ms,
                       attempt=c.attempt + counted, set_ms=c.set_ms, body=fastjson.dumps(body))
        keys = (k.jobs, k.inflight, k.delay[b], k.wake[b],
                k.stat(c.topic), k.minute(), k.hist(c.topic), k.dead_err)
        res = await c.shard.script(
            "retry", keys, (c.tid, c.version, text, delay_ms, self.clock.day(), MINUTE_TTL,
                            fastjson.dumps(error or {}), *observe(c, took_ms)))
        return bool(res[0])

    async def park(self, c: Claimed, delay_ms: int) -> bool:
        """Put a claimed job that was not called back in its delay bucket, due in `delay_ms`,
        without counting an attempt; False when it changed meanwhile."""
        k = self.keys
        b = k.bucket(c.tid)
        keys = (k.jobs, k.inflight, k.delay[b], k.wake[b])
        return bool(await c.shard.script("park", keys, (c.tid, c.version, delay_ms)))

    async def bury(self, c: Claimed, error: dict[str, Any], *, called: bool = True,
                   took_ms: int | None = None) -> bool:
        """Keep a job that used up its attempts as a dead letter, its alert mail owed (see
        `owed_alerts`); False when it changed meanwhile."""
        k = self.keys
        keys = (k.jobs, k.inflight, k.dead, k.dead_err,
                k.stat(c.topic), k.minute(), k.hist(c.topic), k.alerts)
        args = (c.tid, c.version, fastjson.dumps(error), self.clock.day(), MINUTE_TTL,
                1 if called else 0, alerts.ALERT_HEAD_START_MS,
                *observe(c, took_ms if called else None))
        return bool(await c.shard.script("bury", keys, args))

    async def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[JobInfo]:
        """Dead letters on every shard, newest first, optionally of one topic."""
        out: list[JobInfo] = []
        for shard in self.shards.shards:
            tids = await shard.call("ZREVRANGE", self.keys.dead, 0, -1 if topic else limit - 1)
            for raw_tid in tids:
                t, job_id = split_tid(raw_tid.decode())
                if topic and t != topic:
                    continue
                info = await self.lookup(t, job_id)
                if info is not None:
                    out.append(info)
                if len(out) >= limit:
                    return out
        return out

    async def redrive(self, topic: str, job_id: str) -> bool:
        """Give a dead letter fresh attempts and make it due now. BadPayload when its
        stored job cannot be read."""
        k = self.keys
        tid = make_tid(topic, job_id)
        found = await self._find(tid)
        if found is None:
            return False
        shard, raw = found
        data = payload.decode(raw)  # BadPayload: it cannot be (delete it instead)
        b = k.bucket(tid)
        now_ms = int(time.time() * 1000)
        # Fresh attempts: due now, and no failed ones counted (see `retry`).
        body = {k: v for k, v in self.clock.full_body(data).items() if k != "exp_notify_nums"}
        body["notify_time"] = self.clock.fmt_time(now_ms)
        text = payload.encode(version=new_version(), priority=data.priority, due_ms=now_ms,
                       attempt=0, set_ms=data.set_ms or now_ms, body=fastjson.dumps(body))
        keys = (k.jobs, k.dead, k.dead_err, k.delay[b], k.wake[b],
                k.guests)
        # A dead letter that died away from its owner lives on as a guest: moved home later.
        guest = 0 if shard is self.shards.owner(tid) else 1
        return bool(await shard.script("redrive", keys, (tid, text, guest)))
