"""The job state machine: the Python face of dq/storage/lua/*.lua.

Only this module knows Redis key names. Every state change of a job is one Lua script on
the job's shard (see DESIGN.md section 2); this module builds the keys and arguments,
routes each tid to its shard and decodes what the scripts return.

A job's payload is "<version>|<priority>|<attempt>|<due>|<due - set>|<body JSON>", times
in hex milliseconds (set: when it was added), attempt the deliveries made so far (failed
ones, and ones cut off by an expired lease: requeue_expired.lua counts those). The scripts
read version and priority with a prefix match (dq/storage/lua/_job.lua) instead of decoding the
body, and the fixed part costs ~35 bytes per pending job.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import json
import logging
import math
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from redis.exceptions import NoScriptError

from dq import fastjson
from dq.errors import UNAVAILABLE, DqError
from dq.sharding.resp import ReplicasBehind, ShardRefused
from dq.sharding.shards import SCRIPTS, Shard, ShardSet
from dq.storage.fence import Fence

log = logging.getLogger("dq.store")

MINUTE_TTL = 2 * 3600  # per-minute counters feed the console's last-hour chart
# Most jobs in one batched script call (add, ack): a bigger batch (a burst of pipelined
# adds) is split, so no single call holds a shard for more than a few milliseconds.
ADD_BATCH = 500
# After this process writes a guest to a shard, its adds evict older copies there for this
# long (ms) even before the checker's record says the shard holds guests.
GUESTS_FRESH_MS = 10_000
# After the `buckets` setting changes, the delayed jobs are moved to their new buckets
# (Store.rebucket), and gone through again on later calls for this long: processes still
# on the old setting (a reload's draining generation) may add a few more meanwhile.
REBUCKET_AGAIN_MS = 10 * 60 * 1000
REBUCKET_BATCH = 500
# Most ready entries one claim moves to held lists (their topic may not be called now):
# a long run of a paused topic's jobs is gone through in several short calls.
HOLD_BATCH = 1000
# A dead letter's alert mail is owed until sent (the alerts zset): the burying consumer
# has this head start (ms) before a sweep may mail it, and a sweep's claim lasts as long.
ALERT_HEAD_START_MS = 5 * 60 * 1000
# The scripts that take many jobs per call, and how many reply values each job gets.
BATCHED = {"add": 2, "ack": 1, "evict": 1}
STAT_FIELDS = ("writes", "notifies", "ok", "fail", "retries", "dead", "dels")
STATES = ("delayed", "ready", "inflight", "dead")
# Upper bounds (seconds) of the delivery histograms' buckets; +Inf is implied.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0)
CALLBACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HISTOGRAMS = {"late": LATENESS_BUCKETS, "cb": CALLBACK_BUCKETS}


def make_tid(topic: str, job_id: str) -> str:
    return f"{topic}:{job_id}"


def split_tid(tid: str) -> tuple[str, str]:
    topic, _, job_id = tid.partition(":")
    return topic, job_id


_VERSION_PREFIX = secrets.token_hex(4)
_version_seq = itertools.count(1)


def _new_prefix() -> None:
    """A forked child makes versions of its own: the parent's prefix and counter would
    give another child's versions too."""
    global _VERSION_PREFIX, _version_seq
    _VERSION_PREFIX = secrets.token_hex(4)
    _version_seq = itertools.count(1)


os.register_at_fork(after_in_child=_new_prefix)


def new_version() -> str:
    """A version no other add will produce: a random per-process prefix and a counter."""
    return f"{_VERSION_PREFIX}{next(_version_seq):x}"


def _pairs(flat: list[bytes]) -> list[tuple[str, bytes]]:
    """HGETALL's flat [field, value, ...] reply as (field, value) pairs."""
    return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat) - 1, 2)]


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(bound)


# Each histogram's bucket fields, `<name>:<le>`, in bound order and then +Inf.
_HIST_FIELDS = {name: [f"{name}:{_le(b)}" for b in bounds] + [f"{name}:+Inf"]
                for name, bounds in HISTOGRAMS.items()}


def _hist_field(name: str, ms: int) -> str:
    """The bucket field an observation of `ms` milliseconds lands in: `<name>:<le>`."""
    return _HIST_FIELDS[name][bisect.bisect_left(HISTOGRAMS[name], ms / 1000)]


@dataclass(frozen=True, slots=True)
class Stored:
    """A payload read back from Redis."""

    version: str
    priority: int
    attempt: int
    due_ms: int
    set_ms: int
    body: dict[str, Any]  # as stored: without notify_time/dq_set_time on a first attempt


def payload(*, version: str, priority: int, due_ms: int, attempt: int, set_ms: int,
            body: str) -> str:
    """The stored text. Topic and id are not in it (the hash field, the tid, has them),
    nor the original's notify_time and dq_set_time: they are derived from due and set
    when the body is read (`Store.full_body`)."""
    return f"{version}|{priority}|{attempt}|{due_ms:x}|{due_ms - set_ms:x}|{body}"


class BadPayload(ValueError):
    """A stored job that cannot be read (written by hand, or damaged): says what is wrong."""


# The version a script reads off a payload (job_vp in dq/storage/lua/_job.lua), for one whose other
# parts cannot be read.
_VERSION_OF = re.compile(rb'^([0-9A-Fa-f]+)\|\d\||^\{"v":"([0-9A-Fa-f]+)","p":\d')


def payload_version(raw: bytes) -> str:
    """The version the scripts see in a payload ("" when there is none)."""
    m = _VERSION_OF.match(raw)
    return "" if m is None else (m.group(1) or m.group(2)).decode()


def parse_payload(raw: bytes) -> Stored:
    """Read a stored payload; BadPayload when it cannot be (its body must be a JSON object)."""
    try:
        # dq 0.1 stored JSON: {"v":..,"p":..,"due":..,"n":..,"set":..,"body":..}
        if raw[:1] == b"{":
            data = json.loads(raw)
            stored = Stored(str(data["v"]), int(data.get("p", 2)), int(data.get("n", 0)),
                            int(data.get("due", 0)), int(data.get("set", 0)),
                            data.get("body", {}))
        else:
            version, prio, attempt, due_hex, ahead, body = raw.split(b"|", 5)
            due = int(due_hex, 16)
            stored = Stored(version.decode(), int(prio), int(attempt), due,
                            due - int(ahead, 16), fastjson.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadPayload(f"{exc.__class__.__name__}: {exc}"[:200]) from None
    if not isinstance(stored.body, dict):
        raise BadPayload(f"its body is a JSON {type(stored.body).__name__}, not an object")
    return stored


# One job's part of a batched script call: its keys and its arguments. For an add:
# (delay key, wake key, stat key), (tid, payload, due or "", delay ms, guest 1|0).
Part = tuple[tuple[str, ...], tuple[Any, ...]]
AddJob = Part
# Called once per queued job: its reply values, or the error that sent it nowhere.
Done = Callable[[Any, BaseException | None], None]
AddDone = Done


def _to_future(fut: asyncio.Future[Any]) -> Done:
    def done(res: Any, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_result(res) if exc is None else fut.set_exception(exc)
    return done


@dataclass(frozen=True)
class Histogram:
    """A Prometheus-style histogram: cumulative counts per upper bound, ending at +Inf."""

    buckets: list[tuple[str, int]]  # (le, observations <= le), ascending
    count: int
    sum: float  # seconds


def _histogram(name: str, bounds: Sequence[float], raw: dict[str, int]) -> Histogram:
    per = {b: 0 for b in (*bounds, math.inf)}
    prefix = name + ":"
    for key, n in raw.items():
        if key.startswith(prefix) and key != prefix + "sum_ms":
            try:
                bound = float(key[len(prefix):])
            except ValueError:
                continue
            per[bound] = per.get(bound, 0) + n  # a bound no longer configured still counts
    out, total = [], 0
    for bound in sorted(per):
        total += per[bound]
        out.append((_le(bound), total))
    return Histogram(out, total, raw.get(prefix + "sum_ms", 0) / 1000)


@dataclass(frozen=True, slots=True)
class FlowLimit:
    """A topic's flow control on one shard, as the claim script takes it: its share of the
    topic's rate (calls per second, 0 = none), burst and concurrency (0 = none)."""

    topic: str
    rate: float = 0.0
    burst: float = 1.0
    concurrency: int = 0
    paused: bool = False


@dataclass(frozen=True)
class Claimed:
    """A job leased to a consumer: deliver it, then ack, retry or bury it."""

    shard: Shard
    tid: str
    topic: str
    id: str
    version: str
    priority: int
    attempt: int  # deliveries before this one: failed, or cut off by an expired lease
    due_ms: int
    set_ms: int
    body: dict[str, Any]
    claimed_ms: int  # shard clock at claim
    unreadable: str = ""  # why the stored job cannot be read: not called, kept as dead
    flow_lease: int = 0  # its lease deadline when it took a topic concurrency slot, else 0


@dataclass(frozen=True)
class JobInfo:
    """What the console shows of one job."""

    shard: str
    topic: str
    id: str
    state: str  # delayed | ready | inflight | dead
    due_ms: int
    attempt: int
    priority: int
    body: dict[str, Any]
    error: dict[str, Any] | None = None
    unreadable: str = ""  # why the stored job cannot be read (its body is then {})

    @property
    def retrying(self) -> bool:
        """Whether the job waits for another attempt after failed ones (its `due_ms` is
        when that attempt is due, `error` the last one's error)."""
        return self.state in ("delayed", "ready") and self.attempt > 0


@dataclass(frozen=True)
class AddResult:
    replaced: bool
    due_ms: int
    shard: str


class Store:
    """Job operations over a ShardSet, with keys under one prefix."""

    def __init__(self, shards: ShardSet, *, prefix: str = "dq:", buckets: int = 8,
                 zone: ZoneInfo | None = None, orig_prefix: str = "",
                 add_timeout: float = 0.0) -> None:
        self.shards = shards
        # Adds answered within add_timeout even when their shard hangs (dq/storage/fence.py).
        self.fence = Fence(self, add_timeout)
        self.prefix = prefix
        self.buckets = buckets
        self.zone = zone
        self.k_jobs = prefix + "jobs"
        self.k_inflight = prefix + "inflight"
        self.k_dead = prefix + "dead"
        # A job's last error: a dead letter's, and a retrying job's while it waits (retry.lua
        # sets it; ack, a replacing add, redrive and delete remove it).
        self.k_dead_err = prefix + "dead:err"
        self.k_guests = prefix + "guests"
        self.k_moving = prefix + "moving"
        self.k_layout = prefix + "layout"  # the bucket count the delayed jobs are kept in
        self.k_alerts = prefix + "alerts"  # dead letters whose alert mail is owed
        # Circuit breakers (dq/roles/breaker.py), on each topic's home shard: the state per topic,
        # and the mails owed for their openings and closings.
        self.k_breaker_mail = prefix + "breaker:mail"
        self.k_ready = tuple(f"{prefix}ready:{p}" for p in (1, 2, 3))
        # Flow control (dq/storage/lua/claim.lua): per-topic tokens and calls in flight, the leases
        # counted in those, and the topics whose jobs wait in a held list (k_held).
        self.k_flow = prefix + "flow"
        self.k_flow_lease = prefix + "flow:lease"
        self.k_held_set = prefix + "held"
        self.k_delay = tuple(f"{prefix}delay:{b}" for b in range(buckets))
        self.k_wake = tuple(f"{prefix}wake:{b}" for b in range(buckets))
        # The dataset's token: names its counters in the registry's export marks
        # (dq/roles/statexport.py)
        self.k_stat_epoch = prefix + "statepoch"
        # php-delayqueue's layout (DqRedis with DqConf::$prefix, "dq_" by default), whose
        # jobs dq adopts (dq/storage/adopt.py): job hash `<p>job_info`, bucket zsets
        # `<p>bucket_<n>`, ready lists `<p><priority>ready_queue`. "" = not looked for.
        self.orig_prefix = orig_prefix
        self.k_orig_jobs = f"{orig_prefix}job_info" if orig_prefix else ""
        self._day = ("", 0)
        self._times: dict[int, str] = {}
        self._queued: dict[tuple[str, Shard], list[tuple[Part, Done]]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._k_stat: dict[str, str] = {}  # per topic: made once per add otherwise
        # Called after a batch's jobs were told their results (the server writes the
        # replies they made ready then, in the same loop turn); `settling` while telling.
        self.after_settle: list[Callable[[], None]] = []
        self.settling = 0

    # keys -------------------------------------------------------------------------------
    def bucket(self, tid: str) -> int:
        return zlib.crc32(tid.encode()) % self.buckets

    def k_stat(self, topic: str) -> str:
        key = self._k_stat.get(topic)
        if key is None:
            if len(self._k_stat) >= 4096:
                self._k_stat.clear()
            key = self._k_stat[topic] = f"{self.prefix}stat:{topic}"
        return key

    def k_orig_ready(self, priority: int) -> str:
        return f"{self.orig_prefix}{priority}ready_queue"

    def orig_patterns(self) -> tuple[str, str]:
        """SCAN patterns of the original's ready lists and bucket zsets."""
        p = re.sub(r"([*?\[\]\\])", r"\\\1", self.orig_prefix)
        return f"{p}*ready_queue", f"{p}bucket_*"

    def k_held(self, topic: str) -> str:
        """The list of a flow-controlled topic's jobs that were ready but held back."""
        return f"{self.prefix}held:{topic}"

    def k_hist(self, topic: str) -> str:
        return f"{self.prefix}hist:{topic}"

    def k_minute(self, epoch_min: int | None = None) -> str:
        if epoch_min is None:
            epoch_min = int(time.time() // 60)
        return f"{self.prefix}statm:{epoch_min}"

    def day(self) -> str:
        """Today as YYYYMMDD in the configured zone (cached for a second)."""
        now = int(time.time())
        if self._day[1] != now:
            self._day = (datetime.fromtimestamp(now, self.zone).strftime("%Y%m%d"), now)
        return self._day[0]

    def fmt_time(self, epoch_ms: int) -> str:
        """'Y-m-d H:i:s' in the configured zone (memoised per second: the hot path)."""
        sec = epoch_ms // 1000
        text = self._times.get(sec)
        if text is None:
            if len(self._times) > 4096:
                self._times.clear()
            text = datetime.fromtimestamp(sec, self.zone).strftime("%Y-%m-%d %H:%M:%S")
            self._times[sec] = text
        return text

    def full_body(self, stored: Stored) -> dict[str, Any]:
        """The body a callback or `get` sees: with the original's notify_time (when the job
        was due at its add) and dq_set_time (when it was added), unless it has them."""
        body = stored.body
        if "notify_time" not in body:
            body["notify_time"] = self.fmt_time(stored.due_ms)
        if "dq_set_time" not in body:
            body["dq_set_time"] = self.fmt_time(stored.set_ms)
        return body

    # client operations ------------------------------------------------------------------
    def add_job(self, topic: str, job_id: str, body: dict[str, Any], *, priority: int = 2,
                due_ms: int | None = None, delay_ms: int | None = None,
                exclude: Collection[str] = ()) -> tuple[Shard, AddJob]:
        """The shard an add goes to and its part of an add script call. The shard is the
        tid's owner, else the next healthy one; shards named in `exclude` (they just
        failed this add) are passed over."""
        tid = f"{topic}:{job_id}"  # make_tid, spelled out: this runs once per add
        now_ms = int(time.time() * 1000)
        if due_ms is None:
            delay_ms = max(0, delay_ms or 0)
            est_due = now_ms + delay_ms
        else:
            est_due = due_ms
        if "notify_time" in body:  # the original overwrites it (kept in its place)
            body = {**body, "notify_time": self.fmt_time(est_due)}
        # payload(version=new_version(), attempt=0, ...), spelled out for the same reason
        text = (f"{_VERSION_PREFIX}{next(_version_seq):x}|{priority}|0|{est_due:x}|"
                f"{est_due - now_ms:x}|{fastjson.dumps(body)}")
        b = self.bucket(tid)
        shard, owned = self.shards.route(tid, exclude)
        if owned:
            # The add replaces the job. While other shards hold guests (the checker's
            # record says which, or this process wrote one there lately), an older copy of
            # it may be one of them: it must go too, or it would fire as well (or be moved
            # home over this one once delivered).
            for other in self.shards.shards:
                if other is not shard and (other.has_guests or now_ms < other.guests_until):
                    part = ((self.k_delay[b],), (tid,))
                    self.queue("evict", other, part, functools.partial(self._evicted, other,
                                                                       part))
        else:
            shard.guests_until = now_ms + GUESTS_FRESH_MS
        return shard, ((self.k_delay[b], self.k_wake[b], self.k_stat(topic)),
                       (tid, text, "" if due_ms is None else due_ms, delay_ms or 0,
                        0 if owned else 1))

    def _evicted(self, shard: Shard, part: Part, res: Any, exc: BaseException | None) -> None:
        """An eviction that failed because Redis lost its scripts (a restart) is sent again
        on its own, which reloads them; any other failure is left to the sweep."""
        if isinstance(exc, NoScriptError):
            task = asyncio.ensure_future(shard.evalsha(self.batch_args("evict", [part])))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("eviction failed: %s", task.exception())

    # batched script calls ---------------------------------------------------------------
    def batch_args(self, script: str, parts: Sequence[Part],
                   deadline: str = "") -> tuple[Any, ...]:
        """EVALSHA arguments of one call of a batched script (add, ack) for these jobs, all
        on one shard: the script's own keys and arguments, then each job's. An add call
        may carry a deadline on the shard's clock (dq/storage/fence.py)."""
        args: list[Any] = [self.day(), MINUTE_TTL]
        if script == "add":
            keys = [self.k_jobs, self.k_inflight, self.k_dead, self.k_dead_err, self.k_minute(),
                    self.k_guests]
            args.append(deadline)
        elif script == "evict":
            keys = [self.k_jobs, self.k_guests, self.k_moving, self.k_inflight, self.k_dead]
            args = []
        else:
            keys = [self.k_jobs, self.k_inflight, self.k_minute(), self.k_dead_err]
        for part_keys, part_args in parts:
            keys += part_keys
            args += part_args
        return (SCRIPTS[script][0], len(keys), *keys, *args)

    def add_args(self, jobs: Sequence[AddJob], deadline: str = "") -> tuple[Any, ...]:
        return self.batch_args("add", jobs, deadline)

    async def add_once(self, shard: Shard, job: AddJob) -> Any:
        """One add on `shard` on its own, within add_timeout (dq/storage/fence.py): its reply
        values, or DqError "unavailable"."""
        return await self.fence.add_once(shard, job)

    def queue(self, script: str, shard: Shard, part: Part, done: Done) -> None:
        """Queue one job's call of a batched script without a coroutine (the server's hot
        path). What is queued for a shard in one loop turn goes out as one script call;
        `done` gets the job's reply values, or the error (NoScriptError when Redis lost its
        scripts, or an unavailable DqError) for the caller to retry via `Shard.evalsha`."""
        key = (script, shard)
        batch = self._queued.get(key)
        if batch is None:
            batch = self._queued[key] = []
            # the connection's loop: asyncio.get_running_loop() would cost a syscall
            loop = shard.conn.loop if shard.conn.connected else None
            (loop or asyncio.get_running_loop()).call_soon(self._send, script, shard)
        batch.append((part, done))

    def add_nowait(self, shard: Shard, job: AddJob, done: AddDone) -> None:
        """Queue an add; `done` gets (replaced 0|1, due ms). See `queue`."""
        self.queue("add", shard, job, done)

    def _send(self, script: str, shard: Shard) -> None:
        """The loop turn's batch for a shard, written at once (this runs after the turn's
        reads: nothing more joins it), each job told its result as soon as Redis answers."""
        items = self._queued.pop((script, shard))
        width = BATCHED[script]
        fenced = script == "add" and self.fence.timeout > 0
        for i in range(0, len(items), ADD_BATCH):
            chunk = items[i:i + ADD_BATCH]
            done = [d for _, d in chunk]
            try:
                if fenced:
                    self.fence.send(shard, [part for part, _ in chunk], done)
                else:
                    shard.conn.send_then(functools.partial(self._settle, done, width),
                                         "EVALSHA",
                                         *self.batch_args(script, [part for part, _ in chunk]))
            except Exception as exc:  # a bug here must fail these jobs, not strand them
                self._settle(done, width, None, exc)

    def _settle(self, done: list[Done], width: int, res: Any, exc: BaseException | None,
                ) -> None:
        """A batch's reply (or error), handed to each of its jobs; then `after_settle`."""
        self.settling += 1
        try:
            for i, cb in enumerate(done):
                try:
                    cb(None if exc is not None else res[width * i:width * i + width], exc)
                except Exception:  # one job's bug must not strand the others
                    log.exception("a batched job's callback failed")
        finally:
            self.settling -= 1
        if not self.settling:
            for hook in self.after_settle:
                try:
                    hook()
                except Exception:
                    log.exception("an after_settle hook failed")

    async def _batched(self, script: str, shard: Shard, part: Part) -> Any:
        """One job's call of a batched script, sharing the loop turn's call when the
        shard's connection is up; otherwise (or when that fails) on its own."""
        if shard.conn.connected and not shard.open_until:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.queue(script, shard, part, _to_future(fut))
            try:
                return await fut
            except ReplicasBehind:
                raise  # done on the master: doing it again alone would wait once more
            except (NoScriptError, DqError):
                pass  # Shard.evalsha below reloads scripts, reconnects, marks health
        if script == "add":
            return await self.add_once(shard, part)
        return await shard.evalsha(self.batch_args(script, [part]))

    async def add(self, topic: str, job_id: str, body: dict[str, Any], *, priority: int = 2,
                  due_ms: int | None = None, delay_ms: int | None = None) -> AddResult:
        """Store or replace a job; it falls due at due_ms, else delay_ms from now. When the
        chosen shard is unavailable, the add is tried once more on the next healthy one."""
        shard, job = self.add_job(topic, job_id, body, priority=priority, due_ms=due_ms,
                                  delay_ms=delay_ms)
        try:
            try:
                res = await self._batched("add", shard, job)
            except DqError as exc:
                if exc.err != UNAVAILABLE or isinstance(exc, ShardRefused):
                    raise
                failed = shard
                shard, job = self.add_job(topic, job_id, body, priority=priority,
                                          due_ms=due_ms, delay_ms=delay_ms,
                                          exclude=(failed.name,))
                if shard is failed:
                    raise
                res = await self.add_once(shard, job)
        except ShardRefused as exc:
            raise exc.for_add() from None
        return AddResult(replaced=bool(res[0]), due_ms=int(res[1]), shard=shard.name)

    async def _find(self, tid: str) -> tuple[Shard, bytes] | None:
        """The shard holding tid and its payload: the owner first, then every other shard."""
        order = self.shards.order(tid)
        failed: list[BaseException] = []
        try:
            raw = await order[0].call("HGET", self.k_jobs, tid)
            if raw is not None:
                return order[0], raw
        except DqError as exc:
            failed.append(exc)
        rest = order[1:]
        if rest:
            found = await asyncio.gather(*(s.call("HGET", self.k_jobs, tid) for s in rest),
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
            return await self._orig_body(make_tid(topic, job_id))
        return self.full_body(self._readable(make_tid(topic, job_id), found[1]))

    async def _orig_body(self, tid: str) -> dict[str, Any] | None:
        """The body of a job php-delayqueue left and dq has not adopted yet (dq/storage/adopt.py),
        as the original's `get` would show it; None when there is none, or it is no object."""
        if not self.orig_prefix:
            return None
        found = await asyncio.gather(*(s.call("HGET", self.k_orig_jobs, tid)
                                       for s in self.shards.shards), return_exceptions=True)
        for raw in found:
            if isinstance(raw, bytes):
                try:
                    body = fastjson.loads(raw)
                except ValueError:
                    continue
                if isinstance(body, dict):
                    return body
        return None

    @staticmethod
    def _readable(tid: str, raw: bytes) -> Stored:
        """parse_payload, failing with what a client or the console can act on."""
        try:
            return parse_payload(raw)
        except BadPayload as exc:
            raise DqError(UNAVAILABLE, f"job {tid} is stored in a form dq cannot read ({exc}); "
                          "delete it and add it again") from None

    async def delete(self, topic: str, job_id: str) -> bool:
        """Remove the job from every shard that has it; True when one was removed."""
        tid = make_tid(topic, job_id)
        b = self.bucket(tid)
        keys = (self.k_jobs, self.k_delay[b], self.k_inflight, self.k_dead, self.k_dead_err,
                self.k_stat(topic), self.k_orig_jobs or self.k_jobs)
        args = (tid, self.day())
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
        tid = make_tid(topic, job_id)
        found = await self._find(tid)
        if found is None:
            return None
        shard, raw = found
        try:
            data = parse_payload(raw)
            body = self.full_body(data)
            unreadable = ""
        except BadPayload as exc:  # shown (with why), so that it can be deleted
            data = Stored(payload_version(raw), 2, 0, 0, 0, {})
            body, unreadable = {}, f"the stored job cannot be read: {exc}"
        b = self.bucket(tid)
        delay_score, inflight, dead, err = await asyncio.gather(
            shard.call("ZSCORE", self.k_delay[b], tid),
            shard.call("ZSCORE", self.k_inflight, tid),
            shard.call("ZSCORE", self.k_dead, tid),
            shard.call("HGET", self.k_dead_err, tid),
        )
        due = data.due_ms
        if dead is not None:
            state = "dead"
        elif inflight is not None:
            state = "inflight"
        elif delay_score is not None:
            state, due = "delayed", int(float(delay_score))
        else:
            state = "ready"
        error = json.loads(err) if err else None
        deferred = isinstance(error, dict) and error.get("deferred") is True
        if state != "dead" and data.attempt == 0 and not deferred:
            # A job with no failed attempt has no last error: one left by an earlier job of
            # this id (moved away to its owner shard as a guest) is not its own.
            error = None
        if unreadable and error is None:
            error = {"error": unreadable}
        attempt = data.attempt  # failed calls before the next (or the current) one
        if state == "dead" and isinstance(error, dict) and type(error.get("attempts")) is int:
            attempt = error["attempts"]  # the last call failed too
        return JobInfo(shard=shard.name, topic=topic, id=job_id, state=state, due_ms=due,
                       attempt=attempt, priority=data.priority, body=body, error=error,
                       unreadable=unreadable)

    # timer ------------------------------------------------------------------------------
    async def move_due(self, shard: Shard, buckets: Sequence[int],
                       limit: int = 1000) -> tuple[int, int | None, int]:
        """Move due jobs of these buckets to the ready lists.

        Returns (moved, next due ms or None, shard now ms)."""
        keys = (self.k_jobs, *self.k_ready, *(self.k_delay[b] for b in buckets))
        moved, nxt, now = await shard.script("move_due", keys, (limit,))
        return int(moved), (None if int(nxt) < 0 else int(nxt)), int(now)

    async def rebucket(self, shard: Shard) -> int:
        """Keep every delayed job in the bucket `buckets` gives it (crc32(tid) % buckets)
        after that setting changed: otherwise a timer would never look at a bucket beyond
        the new count, and a job added again, or deleted, would leave its old entry to
        fire. The shard records the count in force ({prefix}layout); when it differs from
        this store's, every bucket that may hold jobs is gone through and each misplaced
        job moved (rebucket.lua), and again on each call for REBUCKET_AGAIN_MS. Cheap
        otherwise (one HGETALL). Returns how many jobs moved."""
        n = self.buckets
        rec = {k: int(v) for k, v in _pairs(await shard.call("HGETALL", self.k_layout))}
        now_ms = int(time.time() * 1000)
        if not rec:
            # A new shard, or one written before dq kept this record: the delay buckets
            # it has tell (dq's keys are few: jobs are fields of one hash).
            most = max([n, *(b + 1 for b in await self._delay_buckets(shard))])
            rec = {"buckets": most if most > n else n, "most": most}
            if most == n:
                await shard.call("HSET", self.k_layout, "buckets", n, "most", n, "changed", 0)
                return 0
        cur, most, changed = rec.get("buckets", n), rec.get("most", n), rec.get("changed", 0)
        if cur == n and now_ms - changed > REBUCKET_AGAIN_MS:
            return 0
        most = max(most, cur, n)
        if cur != n:
            log.warning("shard %s: the buckets setting changed from %d to %d; moving its "
                        "delayed jobs to their new buckets", shard.label, cur, n)
            changed = now_ms
            # Recorded first: a pass cut short is done again by the next call.
            await shard.call("HSET", self.k_layout, "buckets", n, "most", most,
                             "changed", changed)
        moved = 0
        for b in range(most):
            key = f"{self.prefix}delay:{b}"
            cursor = 0
            while True:
                cursor, flat = await shard.call("ZSCAN", key, cursor, "COUNT", REBUCKET_BATCH)
                keys: list[str] = [self.k_jobs, key]
                args: list[Any] = []
                for tid, score in _pairs(flat):
                    nb = self.bucket(tid)
                    if nb != b:
                        keys += (self.k_delay[nb], self.k_wake[nb])
                        args += (tid, score)
                if args:
                    moved += int(await shard.script("rebucket", keys, args))
                cursor = int(cursor)
                if not cursor:
                    break
        if moved:
            log.warning("shard %s: %d delayed job(s) moved to their buckets", shard.label, moved)
        return moved

    async def _delay_buckets(self, shard: Shard) -> list[int]:
        """The bucket numbers of the delay zsets `shard` holds."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + "delay:*"
        found, cursor = [], 0
        while True:
            cursor, keys = await shard.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found += [int(s) for k in keys if (s := k.decode().rpartition(":")[2]).isdigit()]
            cursor = int(cursor)
            if not cursor:
                return found

    # php-delayqueue's jobs (dq/storage/adopt.py) ------------------------------------------------
    async def orig_pending(self, shard: Shard) -> bool:
        """Whether `shard` may hold jobs in the original's layout (one EXISTS: cheap)."""
        if not self.orig_prefix:
            return False
        keys = (self.k_orig_jobs, *(self.k_orig_ready(p) for p in (1, 2, 3)))
        return int(await shard.call("EXISTS", *keys)) > 0

    async def orig_queues(self, shard: Shard) -> tuple[list[tuple[str, int]], list[str]]:
        """The original's ready lists on `shard` (key, priority), priorities 1..3 first,
        and its bucket zsets: whatever DqConf's $bucket and the topics' priorities were."""
        ready_pat, bucket_pat = self.orig_patterns()
        ready: dict[str, int] = {self.k_orig_ready(p): p for p in (1, 2, 3)}
        buckets: list[str] = []
        for pattern in (ready_pat, bucket_pat):
            cursor = 0
            while True:
                cursor, keys = await shard.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                for raw in keys:
                    key = raw.decode()
                    if pattern is bucket_pat:
                        buckets.append(key)
                    elif key not in ready:
                        middle = key[len(self.orig_prefix):-len("ready_queue")]
                        ready[key] = int(middle) if middle.isdigit() else 2
                cursor = int(cursor)
                if not cursor:
                    break
        return list(ready.items()), sorted(set(buckets))

    async def adopt(self, shard: Shard, mode: str, source: str, checks: Sequence[str],
                    jobs: Sequence[tuple[str, bytes, str, int, int, int, int]]) -> list[int]:
        """Move jobs read from the original's `source` (see dq/storage/lua/adopt.lua) into dq's
        layout on `shard`. A job: (tid, body as read, score as read, priority, attempt,
        set ms, 0 owned | 1 guest | 2 the owner holds it). Returns [adopted, superseded,
        gone, changed, raced] (see the script)."""
        keys: list[str] = [self.k_orig_jobs, source, self.k_jobs, self.k_guests, *checks]
        args: list[Any] = [mode, len(checks)]
        for tid, body, score, priority, attempt, set_ms, whose in jobs:
            b = self.bucket(tid)
            keys += (self.k_delay[b], self.k_wake[b])
            args += (tid, body, score, new_version(), priority, attempt, set_ms, whose)
        return [int(n) for n in await shard.script("adopt", keys, args)]

    async def requeue_expired(self, shard: Shard, limit: int = 1000) -> int:
        """Put jobs whose lease ran out back at the head of their ready lists, each with one
        more attempt counted (the delivery cut off); how many."""
        keys = (self.k_jobs, self.k_inflight, *self.k_ready, self.k_flow, self.k_flow_lease)
        return int(await shard.script("requeue_expired", keys, (limit,)))

    def wake_keys(self, buckets: Sequence[int]) -> list[str]:
        return [self.k_wake[b] for b in buckets]

    # consumer ---------------------------------------------------------------------------
    async def claim(self, shard: Shard, n: int, order: Sequence[int], lease_ms: int,
                    flow: Sequence[FlowLimit] = ()) -> list[Claimed]:
        """Lease up to n ready jobs, trying the ready lists in `order` (priorities 1..3).
        The jobs of the topics in `flow` are called only as their limits on this shard
        allow; the others wait in their topic's held list (dq/storage/lua/claim.lua)."""
        keys: tuple[str, ...] = (self.k_jobs, self.k_inflight, self.k_flow, self.k_flow_lease,
                                 self.k_held_set, *(self.k_ready[p - 1] for p in order))
        args: tuple[Any, ...] = (n, lease_ms, len(order), HOLD_BATCH)
        counted: set[str] = set()
        if flow:
            keys += tuple(self.k_held(f.topic) for f in flow)
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
                data = parse_payload(flat[i + 1])
            except BadPayload as exc:
                # Leased with the others: handed out too (the consumer buries it), so it
                # cannot hold the batch's good jobs back.
                out.append(Claimed(
                    shard=shard, tid=tid, topic=topic, id=job_id,
                    version=payload_version(flat[i + 1]), priority=2, attempt=0, due_ms=now,
                    set_ms=now, body={}, claimed_ms=now, unreadable=str(exc)))
                continue
            out.append(Claimed(
                shard=shard, tid=tid, topic=topic, id=job_id, version=data.version,
                priority=data.priority, attempt=data.attempt, due_ms=data.due_ms or now,
                set_ms=data.set_ms or now, body=self.full_body(data), claimed_ms=now,
                flow_lease=now + lease_ms if topic in counted else 0,
            ))
        return out

    async def release(self, c: Claimed) -> bool:
        """Free the concurrency slot a delivered job took (`flow_lease` set), unless its
        lease ran out first and requeue_expired freed it. False when nothing was freed."""
        if not c.flow_lease:
            return False
        keys = (self.k_flow, self.k_flow_lease)
        return bool(await c.shard.script("release", keys, (c.tid, c.flow_lease)))

    async def held_topics(self, shard: Shard) -> set[str]:
        """The topics that may have jobs in a held list on `shard`."""
        return {t.decode() for t in await shard.call("SMEMBERS", self.k_held_set)}

    async def flow_totals(self, topic: str) -> dict[str, int] | None:
        """A topic's calls in flight (counted for its concurrency) and held jobs, summed
        over the shards; None when a shard did not answer (no value rather than a wrong one)."""
        total = {"inflight": 0, "held": 0}
        for shard in self.shards.shards:
            try:
                state = await self.flow_state(shard, topic)
            except DqError:
                return None
            total["inflight"] += int(state["inflight"])
            total["held"] += int(state["held"])
        return total

    async def flow_state(self, shard: Shard, topic: str) -> dict[str, float]:
        """A topic's flow state on `shard`: tokens, calls in flight, jobs held."""
        tok, n = await shard.call("HMGET", self.k_flow, f"{topic}|tok", f"{topic}|n")
        held = await shard.call("LLEN", self.k_held(topic))
        return {"tokens": float(tok or 0), "inflight": int(n or 0), "held": int(held)}

    def observe(self, c: Claimed, took_ms: int | None) -> tuple[Any, ...]:
        """Histogram increments for one callback attempt (none when no call was made):
        lateness = claim time on the shard's clock minus the due time, and the call's
        duration. Each lands in one bucket field; Prometheus's cumulative `le` buckets are
        summed up when read (`histograms`)."""
        if took_ms is None:
            return ()
        late_ms = max(0, c.claimed_ms - c.due_ms)
        took_ms = max(0, int(took_ms))
        return (_hist_field("late", late_ms), 1, "late:sum_ms", late_ms,
                _hist_field("cb", took_ms), 1, "cb:sum_ms", took_ms)

    async def ack(self, c: Claimed, *, took_ms: int | None = None) -> bool:
        """Delete a delivered job; `took_ms` (the call's duration) feeds the histograms."""
        obs = self.observe(c, took_ms)
        part = ((self.k_stat(c.topic), self.k_hist(c.topic)),
                (c.tid, c.version, len(obs) // 2, *obs))
        res = await self._batched("ack", c.shard, part)
        return bool(res[0])

    async def retry(self, c: Claimed, delay_ms: int, *, error: dict[str, Any] | None = None,
                    took_ms: int | None = None, counted: bool = True) -> bool:
        """Reschedule after a failed attempt, keeping its `error` as the job's last error
        (`lookup` shows it); False when the job changed meanwhile. As the original did, the
        body's notify_time becomes the retry's due time and its exp_notify_nums counts the
        failed attempts so far. Not `counted` (the receiver asked to wait: Retry-After),
        the call is counted in the statistics but uses no attempt."""
        b = self.bucket(c.tid)
        due_ms = int(time.time() * 1000) + delay_ms
        body = {**c.body, "notify_time": self.fmt_time(due_ms)}
        if counted:
            failed = c.body.get("exp_notify_nums")
            body["exp_notify_nums"] = failed + 1 if type(failed) is int else 1
        text = payload(version=new_version(), priority=c.priority, due_ms=due_ms,
                       attempt=c.attempt + counted, set_ms=c.set_ms, body=fastjson.dumps(body))
        keys = (self.k_jobs, self.k_inflight, self.k_delay[b], self.k_wake[b],
                self.k_stat(c.topic), self.k_minute(), self.k_hist(c.topic), self.k_dead_err)
        res = await c.shard.script(
            "retry", keys, (c.tid, c.version, text, delay_ms, self.day(), MINUTE_TTL,
                            fastjson.dumps(error or {}), *self.observe(c, took_ms)))
        return bool(res[0])

    async def park(self, c: Claimed, delay_ms: int) -> bool:
        """Put a claimed job that was not called back in its delay bucket, due in `delay_ms`,
        without counting an attempt; False when it changed meanwhile."""
        b = self.bucket(c.tid)
        keys = (self.k_jobs, self.k_inflight, self.k_delay[b], self.k_wake[b])
        return bool(await c.shard.script("park", keys, (c.tid, c.version, delay_ms)))

    # circuit breakers -------------------------------------------------------------------
    def k_breaker(self, topic: str) -> str:
        return f"{self.prefix}breaker:{topic}"

    def breaker_home(self, topic: str) -> Shard:
        """The shard that keeps `topic`'s breaker: the topic key's rendezvous owner, the
        same for every dq instance with the same shards."""
        return self.shards.owner(topic)

    async def breaker(self, topic: str, op: str, *, threshold: int, cooloff_ms: int,
                      probe_ms: int, error: str = "") -> tuple[str, Any]:
        """Ask or tell the topic's breaker (dq/storage/lua/breaker.lua): (verdict, detail)."""
        shard = self.breaker_home(topic)
        res = await shard.script("breaker", (self.k_breaker(topic), self.k_breaker_mail), (
            op, threshold, cooloff_ms, probe_ms, ALERT_HEAD_START_MS, topic, error[:500]))
        verdict = res[0].decode()
        detail = res[1] if len(res) > 1 else None
        return verdict, detail.decode() if isinstance(detail, bytes) else detail

    async def breaker_state(self, topic: str) -> dict[str, int | str]:
        """The topic's breaker as kept: state (closed|open), fails in a row, opened (ms),
        opens and closes (counts); {} when it never counted anything."""
        raw = await self.breaker_home(topic).call("HGETALL", self.k_breaker(topic))
        out: dict[str, int | str] = {}
        for k, v in _pairs(raw):
            text = v.decode()
            out[k] = int(text) if text.lstrip("-").isdigit() else text
        return out

    async def owed_breaker_mails(self, shard: Shard, limit: int = 20) -> list[str]:
        """Breaker mails on `shard` still owed after their head start, claimed for a while
        as `owed_alerts` does: mail each, then `breaker_mail_done`."""
        got = await shard.script("alert_claim", (self.k_breaker_mail,),
                                 (limit, ALERT_HEAD_START_MS))
        return [m.decode() for m in got]

    async def breaker_mail_done(self, topic: str, member: str, shard: Shard | None = None) -> None:
        await (shard or self.breaker_home(topic)).call("ZREM", self.k_breaker_mail, member)

    async def bury(self, c: Claimed, error: dict[str, Any], *, called: bool = True,
                   took_ms: int | None = None) -> bool:
        """Keep a job that used up its attempts as a dead letter, its alert mail owed (see
        `owed_alerts`); False when it changed meanwhile."""
        keys = (self.k_jobs, self.k_inflight, self.k_dead, self.k_dead_err,
                self.k_stat(c.topic), self.k_minute(), self.k_hist(c.topic), self.k_alerts)
        args = (c.tid, c.version, fastjson.dumps(error), self.day(), MINUTE_TTL, 1 if called else 0,
                ALERT_HEAD_START_MS, *self.observe(c, took_ms if called else None))
        return bool(await c.shard.script("bury", keys, args))

    async def owed_alerts(self, shard: Shard, limit: int = 20) -> list[str]:
        """Dead letters on `shard` whose alert mail is owed and whose burying consumer's
        head start is over (it died, was stopped, or the mail server failed), claimed for
        ALERT_HEAD_START_MS: mail each, then `alert_done`."""
        got = await shard.script("alert_claim", (self.k_alerts,), (limit, ALERT_HEAD_START_MS))
        return [t.decode() for t in got]

    async def alert_done(self, shard: Shard, tid: str) -> None:
        """The alert mail of dead letter `tid` is sent, or not owed any more."""
        await shard.call("ZREM", self.k_alerts, tid)

    # dead letters -----------------------------------------------------------------------
    async def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[JobInfo]:
        """Dead letters on every shard, newest first, optionally of one topic."""
        out: list[JobInfo] = []
        for shard in self.shards.shards:
            tids = await shard.call("ZREVRANGE", self.k_dead, 0, -1 if topic else limit - 1)
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
        tid = make_tid(topic, job_id)
        found = await self._find(tid)
        if found is None:
            return False
        shard, raw = found
        data = parse_payload(raw)  # BadPayload: it cannot be (delete it instead)
        b = self.bucket(tid)
        now_ms = int(time.time() * 1000)
        # Fresh attempts: due now, and no failed ones counted (see `retry`).
        body = {k: v for k, v in self.full_body(data).items() if k != "exp_notify_nums"}
        body["notify_time"] = self.fmt_time(now_ms)
        text = payload(version=new_version(), priority=data.priority, due_ms=now_ms,
                       attempt=0, set_ms=data.set_ms or now_ms, body=fastjson.dumps(body))
        keys = (self.k_jobs, self.k_dead, self.k_dead_err, self.k_delay[b], self.k_wake[b],
                self.k_guests)
        # A dead letter that died away from its owner lives on as a guest: moved home later.
        guest = 0 if shard is self.shards.owner(tid) else 1
        return bool(await shard.script("redrive", keys, (tid, text, guest)))

    # statistics -------------------------------------------------------------------------
    async def topic_stats(self, topic: str) -> dict[str, int]:
        """Counters of one topic summed over the reachable shards (totals and per day)."""
        total: dict[str, int] = {}
        for shard in self.shards.shards:
            try:
                raw = await shard.call("HGETALL", self.k_stat(topic))
            except DqError:
                continue
            for k, v in _pairs(raw):
                total[k] = total.get(k, 0) + int(v)
        return total

    async def stat_epoch(self, shard: Shard) -> str:
        """The token of the shard's Redis dataset (made on first use): a Redis emptied
        since gets a new one, so counters exported from it start from zero
        (dq/roles/statexport.py)."""
        token = await shard.call("GET", self.k_stat_epoch)
        if token is None:
            await shard.call("SET", self.k_stat_epoch, secrets.token_hex(8), "NX")
            token = await shard.call("GET", self.k_stat_epoch)
        return str(token.decode())

    async def stat_values(self, shard: Shard, topics: Sequence[str],
                          fields: Sequence[str]) -> dict[str, list[int]]:
        """These counters of these topics on one shard (0 for those never bumped)."""
        rows = await asyncio.gather(*(shard.call("HMGET", self.k_stat(t), *fields)
                                      for t in topics))
        return {t: [int(v) if v is not None else 0 for v in row]
                for t, row in zip(topics, rows, strict=True)}

    async def histograms(self, topic: str) -> dict[str, Histogram]:
        """The topic's delivery histograms summed over the reachable shards:
        "late" (due -> call) and "cb" (call duration), in seconds."""
        raw: dict[str, int] = {}
        for shard in self.shards.shards:
            try:
                flat = await shard.call("HGETALL", self.k_hist(topic))
            except DqError:
                continue
            for k, v in _pairs(flat):
                raw[k] = raw.get(k, 0) + int(v)
        return {name: _histogram(name, bounds, raw) for name, bounds in HISTOGRAMS.items()}

    async def minute_stats(self, minutes: int = 60) -> list[tuple[int, dict[str, int]]]:
        """(epoch minute, counters) for the last `minutes` minutes, summed over shards."""
        now_min = int(time.time() // 60)
        mins = list(range(now_min - minutes + 1, now_min + 1))
        out = {m: {"writes": 0, "ok": 0, "fail": 0} for m in mins}
        for shard in self.shards.shards:
            try:
                rows = await asyncio.gather(*(shard.call("HGETALL", self.k_minute(m))
                                              for m in mins))
            except DqError:
                continue
            for m, row in zip(mins, rows, strict=True):
                for k, v in _pairs(row):
                    out[m][k] = out[m].get(k, 0) + int(v)
        return [(m, out[m]) for m in mins]

    async def retire(self, shard: Shard, batch: int = 500) -> int:
        """Record every job on a retired shard (one that takes no adds) as a guest, so it
        is moved home to its owner like any guest (dq/storage/guests.py); dead letters stay.
        Returns how many were newly recorded. A job written there after the pass (by an
        older generation still routing to it) is caught by the next pass."""
        cursor, added = b"0", 0
        while True:
            cursor, n = await shard.script("retire", (self.k_jobs, self.k_guests, self.k_dead),
                                           (cursor, batch))
            added += int(n)
            if cursor in (b"0", 0, "0"):
                return added

    async def depths(self, shard: Shard) -> dict[str, int]:
        """How many jobs a shard holds in each state, and how many of them are guests
        (their owner is another shard; moved home once it answers)."""
        counts = await asyncio.gather(
            shard.call("HLEN", self.k_jobs),
            *(shard.call("ZCARD", k) for k in self.k_delay),
            *(shard.call("LLEN", k) for k in self.k_ready),
            shard.call("ZCARD", self.k_inflight),
            shard.call("ZCARD", self.k_dead),
            shard.call("SCARD", self.k_guests),
        )
        nb = self.buckets
        # Ready jobs held back by their topic's flow control count as ready.
        held = await asyncio.gather(*(shard.call("LLEN", self.k_held(t))
                                      for t in sorted(await self.held_topics(shard))))
        return {
            "jobs": int(counts[0]),
            "delayed": sum(int(c) for c in counts[1:1 + nb]),
            "ready": sum(int(c) for c in counts[1 + nb:4 + nb]) + sum(int(h) for h in held),
            "inflight": int(counts[4 + nb]),
            "dead": int(counts[5 + nb]),
            "guests": int(counts[6 + nb]),
        }
