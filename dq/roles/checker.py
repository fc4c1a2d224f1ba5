"""The checker role: ping every Redis shard, keep the shared health record, mail alerts.

Every `settings.checker_interval` seconds each shard gets a PING with a short timeout. A
shard that fails continuously for `settings.shard_down_after` seconds is marked DOWN in
`<data_dir>/health.json` (dq/sharding/health.py), which every server, timer and consumer of this
instance follows: adds go to the next shard in the tid's rendezvous order, and loops stop
working the shard. It is marked UP as soon as it answers again. One log line per change.

After each round it moves guests home (`Checker.sweep`, dq/storage/guests.py): jobs written
to a shard while their owner was down go back to the owner once it answers, so that adding
one again cannot leave two copies that both fire. It records which shards hold guests
(`health.json`), so that adds on the owners evict older copies there meanwhile. And it
watches the registry's shard list (`watch_shards`): a change made in the console has the
master reload. A retired shard (the embedded Redis once real shards are configured,
dq/sharding/plan.py) has its jobs recorded as guests each round, so the same sweep moves them
to the shards (`Retirement`), until it holds no job.

Mail goes to the registry's Redis-down recipients (`AlertConf.redis_emails`): one when a
shard goes down and one when it comes back. Outage mails are rate-limited to one per shard
every `mail_every` seconds; an outage that starts within that window is mailed when the
window ends if the shard is still down (with a count of the outages in between), and a
recovery mail is sent only to answer an outage mail. So a flapping shard sends at most two
mails per window, and the last mail always tells the current state. Shards that change
state in the same round share one mail (a Redis Cluster's partitions on one master).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from dq.config import Settings
from dq.errors import DqError
from dq.registry.core import Registry
from dq.roles.alert import send_alert
from dq.roles.statexport import EXPORT_EVERY, StatExporter
from dq.runtime.context import Context
from dq.runtime.loops import pause
from dq.runtime.resources import role_resources
from dq.sharding import cluster
from dq.sharding.health import ShardHealth, health_path, read_health, safe_name, write_health
from dq.sharding.plan import (
    EMBEDDED,
    ShardPlan,
    drained_path,
    drained_record,
    enabled_shards,
    plan_shards,
)
from dq.sharding.shards import Shard, ShardSet
from dq.storage.adopt import ADOPT_EVERY, Adopter
from dq.storage.guests import GuestMover
from dq.storage.store import Store

log = logging.getLogger("dq.checker")

MAIL_EVERY = 600.0  # seconds: at most one outage mail per shard this often
PING_TIMEOUT_MAX = 1.0
_WHY = re.compile(r"is unavailable \((.*)\); retry shortly$")

__all__ = ["MAIL_EVERY", "Checker", "ping", "run", "safe_name"]


async def ping(shard: Shard, timeout: float) -> str:
    """'' when the shard answers PING within `timeout`, else why not.

    Pings go straight to the connection, past the shard's circuit breaker: the checker
    must see a recovery as soon as it happens."""
    try:
        async with asyncio.timeout(timeout):
            await shard.conn.call("PING")
    except DqError as exc:
        why = _WHY.search(exc.msg)  # the reason inside "redis shard X is unavailable (...)"
        return why.group(1) if why else exc.msg
    except TimeoutError:
        shard.conn.close()  # a half-open or hung connection: reconnect next round
        return f"no answer to PING within {timeout:g} s"
    except Exception as exc:
        return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    return ""


@dataclass
class ShardState:
    """What the checker knows and has said about one shard."""

    name: str  # password masked: the record's key and what logs and mails show
    up: bool = True
    since: float = 0.0  # epoch s of the last change
    error: str = ""
    failing_since: float | None = None  # monotonic s of the first failure in a row
    mailed_up: bool = True  # the state the last mail told (none yet: up)
    last_mail: float | None = None  # monotonic s
    outages: int = 0  # outages since the last mail
    guests: bool = False  # holds jobs whose owner is another shard

    def health(self) -> ShardHealth:
        return ShardHealth(self.up, self.since, self.error, self.guests)


class Checker:
    """Rounds of pings over every shard, the state machine per shard, and the mails."""

    def __init__(self, ctx: Context, shards: ShardSet, *, registry: Registry | None = None,
                 mail_every: float = MAIL_EVERY) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.shards = shards
        self.registry = registry
        self.mail_every = mail_every
        self.path = health_path(ctx.settings)
        self.timeout = max(0.2, min(ctx.settings.checker_interval, PING_TIMEOUT_MAX))
        self.states = {s.name: ShardState(safe_name(s.name), since=time.time())
                       for s in shards.shards}
        self.mails: set[asyncio.Task[bool]] = set()
        self.rounds = self.failures = self.changes = self.mailed = self.guests_moved = 0
        self.adopted = 0  # php-delayqueue's jobs adopted (dq/storage/adopt.py)
        self._saved = False
        self._resume()

    def _resume(self) -> None:
        """Start from the record a previous checker left, so an outage it announced is
        neither announced again nor left without its recovery mail."""
        try:
            old = read_health(self.path)
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring unreadable %s (%s)", self.ctx.name, self.path, exc)
            return
        for st in self.states.values():
            prev = old.get(st.name)
            if prev is not None and not prev.up:
                st.up = st.mailed_up = False
                st.since, st.error = prev.since, prev.error
                st.failing_since = time.monotonic()

    async def check(self) -> None:
        """One round: ping every shard, apply the verdicts, save and mail what changed."""
        shards = self.shards.shards
        errors = await asyncio.gather(*(ping(s, self.timeout) for s in shards))
        self.rounds += 1
        now = time.monotonic()
        changed = False
        for shard, error in zip(shards, errors, strict=True):
            changed = self.observe(self.states[shard.name], error, now) or changed
        if changed or not self._saved:
            self.save()
        self.mail_due(now)

    def answering(self, shard: Shard) -> bool:
        """Up, and answered the last ping."""
        st = self.states[shard.name]
        return st.up and st.failing_since is None

    async def sweep(self, mover: GuestMover, budget: float) -> None:
        """Move guests (jobs written to a shard while their owner was down) home to owners
        that answer again, for at most about `budget` seconds: a job left where it was
        written would fire twice if it were added again on its owner."""
        deadline = time.monotonic() + budget
        for shard in self.shards.shards:
            if not self.answering(shard):
                continue
            # its guests belong to the other shards: no use looking while none answers
            homes = any(self.answering(s) for s in self.shards.shards if s is not shard)
            try:
                if homes and time.monotonic() < deadline:
                    counts = await mover.sweep(shard, self.answering, deadline=deadline)
                else:
                    counts = await mover.put_back_stranded(shard, self.answering)
            except DqError as exc:
                log.debug("%s: cannot sweep guests on %s: %s", self.ctx.name, shard.label, exc)
                continue
            homed = counts["moved"] + counts["superseded"]
            if homed or counts["error"]:
                name = self.states[shard.name].name
                log.info("%s: moved %d guest jobs home from shard %s (%s)", self.ctx.name,
                         homed, name, " ".join(f"{k}={n}" for k, n in sorted(counts.items())),
                         extra={"shard": name, "moved": homed})
            self.guests_moved += homed
            try:
                left = await mover.count(shard)
            except DqError:
                continue
            st = self.states[shard.name]
            if st.guests != bool(left):
                st.guests = bool(left)
                self.save()

    def observe(self, st: ShardState, error: str, now: float) -> bool:
        """Apply one ping result; True when the shard's recorded state changed."""
        if error:
            self.failures += 1
            st.error = error
            if st.failing_since is None:
                st.failing_since = now
                log.debug("%s: redis shard %s does not answer: %s", self.ctx.name, st.name,
                          error)
            down_for = now - st.failing_since
            if st.up and down_for >= self.settings.shard_down_after:
                st.up, st.since = False, time.time()
                st.outages += 1
                self.changes += 1
                log.warning("%s: redis shard %s is DOWN: no answer for %.1f s (%s); adds go "
                            "to the other shards", self.ctx.name, st.name, down_for, error,
                            extra={"shard": st.name, "up": False, "error": error})
                return True
            return False
        st.failing_since = None
        if st.up:
            return False
        down_for = time.time() - st.since
        st.up, st.since, st.error = True, time.time(), ""
        self.changes += 1
        log.info("%s: redis shard %s is UP again after %.1f s down", self.ctx.name, st.name,
                 down_for, extra={"shard": st.name, "up": True, "down_s": round(down_for, 1)})
        return True

    def save(self) -> None:
        try:
            write_health(self.path, {st.name: st.health() for st in self.states.values()})
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.ctx.name, self.path, exc)
            return
        self._saved = True

    # mail -------------------------------------------------------------------------------
    def mail_due(self, now: float) -> None:
        """Start the mails the states call for (see the module doc for the rules). Shards
        that change state in the same round share one mail (a Redis Cluster's partitions
        on a master that died go down together: one mail, not one per partition)."""
        due: list[tuple[str, str]] = []
        for st in self.states.values():
            if st.up == st.mailed_up:
                continue
            if not st.up and st.last_mail is not None and now - st.last_mail < self.mail_every:
                continue  # an outage mail went out lately: wait
            due.append(self.mail_text(st))
            st.mailed_up, st.last_mail, st.outages = st.up, now, 0
        if not due:
            return
        subject, text = due[0]
        if len(due) > 1:
            down = sum(1 for subj, _ in due if subj.endswith("is DOWN"))
            parts = ([f"{down} DOWN"] if down else []) + \
                ([f"{len(due) - down} back UP"] if len(due) - down else [])
            subject = f"[dq] {len(due)} redis shards changed state: {', '.join(parts)}"
            text = "\n\n----\n\n".join(f"{subj}\n\n{body}" for subj, body in due)
        task = asyncio.create_task(self._send(subject, text))
        self.mails.add(task)
        task.add_done_callback(self.mails.discard)

    def mail_text(self, st: ShardState) -> tuple[str, str]:
        host = socket.gethostname()
        since = datetime.fromtimestamp(st.since).strftime("%Y-%m-%d %H:%M:%S")
        if st.up:
            subject = f"[dq] redis shard {st.name} is back UP"
            lines = [f"The redis shard {st.name} answers again since {since}.",
                     "Its jobs are being delivered again; jobs written to other shards "
                     "while it was down are moved back to it."]
        else:
            subject = f"[dq] redis shard {st.name} is DOWN"
            lines = [f"The redis shard {st.name} has not answered PING since {since} "
                     f"(for more than {self.settings.shard_down_after:g} s).",
                     f"Last error: {st.error}",
                     "",
                     "New jobs that belong to it are written to the next healthy shard; its "
                     "own jobs wait until it is back (nothing is lost if it restarts with "
                     "its data). Jobs due on the other shards are delivered as usual."]
            if st.outages > 1:
                lines.append(f"It went down {st.outages} times since the last mail.")
        lines += ["", f"Seen by {self.ctx.name} on {host}. Another mail follows when it "
                  "changes state again."]
        return subject, "\n".join(lines)

    async def _send(self, subject: str, text: str) -> bool:
        if self.registry is None:
            log.info("%s: no registry, alert not mailed: %s", self.ctx.name, subject)
            return False
        try:
            conf = await asyncio.to_thread(self.registry.alert)
        except Exception as exc:
            log.warning("%s: cannot read alert settings (%s); not mailed: %s", self.ctx.name,
                        exc, subject)
            return False
        sent = await send_alert(conf, conf.redis_emails, subject, text)
        self.mailed += int(sent)
        return sent

    async def wait_mails(self, timeout: float) -> None:
        if self.mails:
            _done, pending = await asyncio.wait(set(self.mails), timeout=timeout)
            for t in pending:
                t.cancel()


async def watch_shards(ctx: Context, registry: Registry, plan: ShardPlan,
                       every: float) -> None:
    """Ask the master to reload (SIGHUP) once the registry's shard list differs from the one
    this generation works (`plan`): shards registered, edited, enabled or disabled in the
    console take effect within `every` seconds, by the same reload as `kill -HUP`, which
    drops no job. Without a master (a role run on its own) it only logs."""
    settings = ctx.settings
    while True:
        await asyncio.sleep(every)
        try:
            rows = enabled_shards(await asyncio.to_thread(registry.shards))
        except Exception as exc:
            log.debug("%s: cannot read the registry's shards: %s", ctx.name, exc)
            continue
        now = plan_shards(settings, rows, keep_embedded=plan.embedded)
        if now.shards == plan.shards:  # retired ones come and go by themselves
            continue
        names = ", ".join(safe_name(name) for name, _ in now.every)
        if ctx.master_pid is None:
            log.warning("%s: the registry's shards changed (now %s); restart to use them",
                        ctx.name, names)
            return
        log.info("%s: the registry's shards changed (now %s); asking dq-master to reload",
                 ctx.name, names)
        os.kill(ctx.master_pid, signal.SIGHUP)
        return  # the reload replaces this checker


class Retirement:
    """The retired shards of this generation (the embedded Redis once real shards are
    configured): each round their jobs are recorded as guests, which the sweep moves home;
    once one holds no job at all, it is marked drained (dq/sharding/plan.py) and a later start
    no longer runs it."""

    def __init__(self, ctx: Context, store: Store) -> None:
        self.ctx = ctx
        self.store = store
        self.drained: set[str] = set()

    async def run(self, answering: Callable[[Shard], bool]) -> None:
        for shard in self.store.shards.retired:
            if shard.name in self.drained or not answering(shard):
                continue
            same = await self._same_dataset(shard)
            if same is not None:
                # A new URL for the same Redis (a move onto Sentinel): nothing to move, and
                # moving its jobs "home" onto themselves would never end.
                self._drained(shard, f"is the same Redis as {same.label} (a new URL for "
                              "it): its jobs stay where they are")
                continue
            try:
                added = await self.store.maintenance.retire(shard)
                depth = await self.store.stats.depths(shard)
            except DqError as exc:
                log.debug("%s: cannot retire shard %s: %s", self.ctx.name, shard.label, exc)
                continue
            if added:
                log.info("%s: %d job(s) on the retired shard %s go to the configured shards",
                         self.ctx.name, added, shard.label)
            if depth["jobs"] or depth["dead"]:
                continue
            try:  # php-delayqueue's jobs not adopted yet (adopt_loop) are jobs too
                if await self.store.original.pending(shard):
                    continue
            except DqError:
                continue
            self._drained(shard, "holds no job any more")

    async def _same_dataset(self, shard: Shard) -> Shard | None:
        """The shard that stays whose Redis dataset this retired one is (the same dataset
        token, `Stats.stat_epoch`, kept in the data and replicated with it), if any."""
        try:
            token = await self.store.stats.stat_epoch(shard)
            for other in self.store.shards.writers:
                if await self.store.stats.stat_epoch(other) == token:
                    return other
        except DqError:
            pass
        return None

    def _drained(self, shard: Shard, why: str) -> None:
        self.drained.add(shard.name)
        with contextlib.suppress(OSError):
            if shard.name == EMBEDDED:
                drained_path(self.ctx.settings).write_text(
                    "no job left here once real shards were configured\n")
            else:
                with drained_record(self.ctx.settings).open("a", encoding="utf-8") as f:
                    f.write(shard.url + "\n")
        log.info("%s: the retired shard %s %s; a restart leaves it out", self.ctx.name,
                 shard.label, why)


def checker_store(settings: Settings, plan: ShardPlan) -> Store:
    """The checker's own store: short command timeouts, and no health record to follow
    (it writes that record)."""
    shards = ShardSet.from_urls(plan.shards, plan.retired, command_timeout=2.0,
                                cluster_partitions=settings.cluster_partitions,
                                replica_acks=settings.replica_acks)
    return Store(shards, prefix=settings.prefix, buckets=settings.buckets, zone=settings.zone,
                 orig_prefix=settings.adopt_prefix)


async def adopt_loop(ctx: Context, checker: Checker, adopter: Adopter, mover: GuestMover,
                     registry: Registry | None, every: float = ADOPT_EVERY) -> None:
    """Adopt the jobs php-delayqueue left (dq/storage/adopt.py): a pass at start, then one every
    `every` seconds (one EXISTS per shard when there is nothing). Shards given guests by
    it are recorded as holding guests at once, so that adds on the owners evict them."""
    while not ctx.stopping.is_set():
        try:
            topics = {} if registry is None else await asyncio.to_thread(registry.topics)
            done = await adopter.adopt_all({k: t.priority for k, t in topics.items()})
            checker.adopted += sum(c["adopted"] for c in done.values())
            for shard in checker.shards.shards:
                counts = done.get(shard.label)
                st = checker.states[shard.name]
                if counts and counts["adopted"] and not st.guests \
                        and await mover.count(shard):
                    st.guests = True
                    checker.save()
        except Exception as exc:  # never fatal to the checker: tried again later
            log.warning("%s: adopting php-delayqueue's jobs failed (%s: %s); trying again "
                        "in %.0f s", ctx.name, exc.__class__.__name__, exc, every)
        await pause(ctx.stopping, every)


async def export_loop(ctx: Context, exporter: StatExporter,
                      every: float = EXPORT_EVERY) -> None:
    """Export dq's counters to the original console's dq_stat every `every` seconds
    (dq/roles/statexport.py), and once more when stopping."""
    failing = False
    while True:
        stopping = ctx.stopping.is_set()
        try:
            await exporter.export()
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("%s: exporting counters to dq_stat failed (%s: %s); trying "
                            "again every %.0f s", ctx.name, exc.__class__.__name__, exc, every)
            failing = True
        if stopping:
            return
        await pause(ctx.stopping, every)


async def _warn_stray(shards: ShardSet, prefix: str) -> None:
    await cluster.warn_stray(shards.shards, prefix)


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
        shards = store.shards
        checker = Checker(ctx, shards, registry=registry, mail_every=mail_every)
        mover = GuestMover(store)
        retirement = Retirement(ctx, store)
        log.info("%s started: %d shard(s), every %.1f s, down after %.1f s, record %s",
                 ctx.name, len(shards.shards), settings.checker_interval,
                 settings.shard_down_after, checker.path)
        watch = None if registry is None else asyncio.create_task(
            watch_shards(ctx, registry, plan, settings.registry_refresh))
        duties = []
        if settings.adopt_prefix:
            duties.append(asyncio.create_task(
                adopt_loop(ctx, checker, Adopter(store), mover, registry), name="adopt"))
        if registry is not None:
            duties.append(asyncio.create_task(
                export_loop(ctx, StatExporter(store, registry)), name="stat-export"))
        # a Redis Cluster's jobs under another cluster_partitions count: said once, at start
        duties.append(asyncio.create_task(_warn_stray(shards, settings.prefix),
                                          name="cluster-stray"))
        try:
            while not ctx.stopping.is_set():
                started = time.monotonic()
                await checker.check()
                ctx.ready.set()
                await retirement.run(checker.answering)
                await checker.sweep(mover, budget=settings.checker_interval / 2)
                wait = max(0.0, settings.checker_interval - (time.monotonic() - started))
                await pause(ctx.stopping, wait)
        finally:
            if watch is not None:
                watch.cancel()
            # the last export runs on stopping; adoption stops where it is (a later pass
            # goes on)
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.gather(*duties, return_exceptions=True)
            for task in duties:
                task.cancel()
            await checker.wait_mails(12.0)
            log.info("%s stopped: rounds=%d failures=%d changes=%d mailed=%d guests_moved=%d "
                     "adopted=%d", ctx.name, checker.rounds, checker.failures, checker.changes,
                     checker.mailed, checker.guests_moved, checker.adopted)
