"""A consumer's mail: a dead letter's alert and a circuit breaker's opening or closing,
sent in the background and owed until sent (dq/storage/alerts.py);
and the sweep (Duty.ALERT_SWEEP, consumer 0) that mails what is still owed: its consumer
died or was stopped before mailing, or the mail server failed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from dq.registry.core import Topic
from dq.registry.topics import TopicCache
from dq.roles.alert import breaker_mail, dead_letter_mail, send_alert
from dq.roles.consumer.deliver import SHARD_ERRORS
from dq.runtime.context import Context
from dq.runtime.loops import pause
from dq.runtime.resources import RoleResources
from dq.sharding.shards import Shard
from dq.storage.store import Claimed, Store, split_tid

log = logging.getLogger("dq.consumer")

ALERT_WAIT = 12.0  # at stop, how long mails still being sent may take
ALERT_SWEEP = 30.0  # seconds between the sweep's looks for alert mails still owed
ALERT_GIVE_UP_MS = 24 * 3600 * 1000  # an alert not mailed within this is dropped


class Alerts:
    """The mails one consumer sends, and the tasks still sending them."""

    def __init__(self, ctx: Context, store: Store, topics: TopicCache,
                 resources: RoleResources) -> None:
        self.ctx = ctx
        self.store = store
        self.topics = topics
        self.resources = resources  # the registry (alert settings), opened when first needed
        self.tasks: set[asyncio.Task[None]] = set()

    def dead_letter(self, topic: Topic, c: Claimed, error: dict[str, Any]) -> None:
        """Mail the alert of a job just kept as a dead letter, in the background."""
        self._later(self._alert(topic, c, error))

    def breaker_changed(self, topic: Topic, member: str) -> None:
        """Mail a breaker's opening or closing (`member`, as owed), in the background."""
        self._later(self._breaker_mail(topic, member))

    def _later(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self) -> None:
        """At stop: give the mails still being sent ALERT_WAIT seconds, then cancel them."""
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=ALERT_WAIT)
            for t in pending:
                t.cancel()

    async def _alert(self, topic: Topic, c: Claimed, error: dict[str, Any]) -> None:
        """Mail a dead letter's alert; once mailed (or with nobody to mail) it is no longer
        owed. One that fails stays owed: the sweep tries it again later."""
        try:
            registry = await self.resources.registry_now()
            conf = await asyncio.to_thread(registry.alert)
            subject, text = dead_letter_mail(topic, c, error)
            sent = await send_alert(conf, topic.emails, subject, text)
            if sent or not (conf.host and any(a.strip() for a in topic.emails)):
                await self.store.alerts.alert_done(c.shard, c.tid)
        except Exception:
            log.exception("%s: alert for dead letter %s failed", self.ctx.name, c.tid)

    async def _breaker_mail(self, topic: Topic, member: str, shard: Shard | None = None) -> None:
        """Mail a breaker's opening or closing; once mailed (or with nobody to mail) it is
        no longer owed. One that fails stays owed: the sweep tries it again."""
        try:
            registry = await self.resources.registry_now()
            conf = await asyncio.to_thread(registry.alert)
            subject, text = breaker_mail(topic, json.loads(member))
            sent = await send_alert(conf, topic.emails, subject, text)
            if sent or not (conf.host and any(a.strip() for a in topic.emails)):
                await self.store.alerts.breaker_mail_done(topic.topic, member, shard)
        except Exception:
            log.exception("%s: breaker mail for topic %s failed", self.ctx.name, topic.topic)

    # the sweep (Duty.ALERT_SWEEP) --------------------------------------------------------
    async def sweep(self) -> None:
        """Mail, every ALERT_SWEEP seconds, the alerts still owed on every shard."""
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
