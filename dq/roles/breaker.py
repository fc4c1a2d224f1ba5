"""Per-topic circuit breakers, the consumer's side (the state: dq/storage/lua/breaker.lua).

A topic with `breaker_threshold` N > 0 has one breaker, kept in Redis on the topic's home
shard (the topic key's rendezvous owner, Alerts.breaker_home), so it holds across every
consumer and dq instance: each shard's jobs ask the one breaker. After N failed callbacks
in a row (any consumer's), it opens: jobs claimed meanwhile are parked, not called and
not counted as attempts, until `breaker_cooloff` seconds after it opened; then one job is
the probe; its success closes the breaker, its failure starts a new cool-off. Opening and
closing each owe one mail to the topic's emails, mailed by the consumer that saw the
change, else by consumer 0's sweep (the owed record is in Redis, as for dead letters).

A consumer caches a closed verdict for CACHE seconds (until its next failed call), so a
closed breaker costs no script call per job, one per failure, and a call or two per
CACHE seconds for the successes (`Breakers.record`). A consumer that saw no failure
may still start calls for up to CACHE seconds after the breaker opened. With
the home shard down, the breaker counts as closed (jobs are called as if it had none) and
a warning is logged.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from dq.registry.core import Topic
from dq.storage.store import Store

log = logging.getLogger("dq.breaker")

CACHE = 0.5  # seconds a consumer trusts a closed verdict
PROBE_SLACK_MS = 2000  # a probe's claim outlasts its call's timeout by this much
WAIT_SPREAD = 0.1  # waiting jobs come back over this share of their wait more, not at once


@dataclass(frozen=True)
class Change:
    """A breaker that opened or closed on this consumer's outcome; its mail is owed."""

    topic: str
    event: str  # open | close
    member: str  # the owed-mail record (JSON)


class Breakers:
    """One consumer's view of the topics' breakers."""

    def __init__(self, store: Store, lease_ms: int) -> None:
        self.store = store
        self.lease_ms = lease_ms
        self._closed_until: dict[str, float] = {}  # topic -> monotonic time
        # topic -> monotonic time until which the breaker is taken to be closed with no
        # failure counted: a success then changes nothing and is not reported
        self._clean_until: dict[str, float] = {}
        self._warned = 0.0
        self._ok_busy: set[str] = set()  # topics with a success being reported
        self._ok_more: set[str] = set()  # ... and more successes to report after it

    def _probe_ms(self, topic: Topic) -> int:
        return min(self.lease_ms, topic.timeout_ms + PROBE_SLACK_MS)

    async def _ask(self, topic: Topic, op: str, error: str = "") -> tuple[str, object]:
        return await self.store.alerts.breaker(
            topic.topic, op, threshold=topic.breaker_threshold,
            cooloff_ms=topic.breaker_cooloff * 1000, probe_ms=self._probe_ms(topic), error=error)

    def _down(self, topic: Topic, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > 30:
            self._warned = now
            log.warning("circuit breaker of topic %s cannot be read on shard %s (%s: %s); "
                        "calling as if closed", topic.topic,
                        self.store.alerts.breaker_home(topic.topic).label,
                        exc.__class__.__name__, exc)

    async def admit(self, topic: Topic) -> tuple[bool, int]:
        """(probe, wait_ms): wait_ms > 0 means do not call, look again after that long;
        probe means this call is the open breaker's one probe."""
        if self._closed_until.get(topic.topic, 0.0) > time.monotonic():
            return False, 0
        try:
            verdict, detail = await self._ask(topic, "check")
        except Exception as exc:
            self._down(topic, exc)
            return False, 0
        if verdict == "call":
            until = time.monotonic() + CACHE
            self._closed_until[topic.topic] = until
            if not detail:  # no failure counted
                self._clean_until[topic.topic] = until
            return False, 0
        if verdict == "probe":
            log.info("circuit breaker of topic %s: sending a probe", topic.topic)
            return True, 0
        wait = max(1000, int(str(detail or 0)))
        return False, wait + int(wait * WAIT_SPREAD * random.random())

    async def record(self, topic: Topic, ok: bool, error: str) -> Change | None:
        """Tell the breaker a call's outcome; the change it made, if it opened or closed.

        A success only resets the failures in a row, or closes the breaker: it is not
        reported while the breaker was seen closed with no failure counted within CACHE
        seconds, and successes are coalesced while this consumer's report of one is on
        its way (the next ones are told as one more report). So a healthy topic's breaker
        costs a script call or two per consumer every CACHE seconds, not one per callback;
        a success may go unreported for up to CACHE seconds after another consumer's
        failure, the breaker then counting that failure and the next ones as in a row."""
        key = topic.topic
        if not ok:  # ask the breaker itself before the next call: it may be about to open
            self._closed_until.pop(key, None)
            self._clean_until.pop(key, None)
            return await self._tell(topic, "fail", error)
        if self._clean_until.get(key, 0.0) > time.monotonic():
            return None
        if key in self._ok_busy:
            self._ok_more.add(key)
            return None
        self._ok_busy.add(key)
        change = None
        try:
            while True:
                self._ok_more.discard(key)
                change = await self._tell(topic, "ok", "") or change
                if key not in self._ok_more:
                    if key in self._closed_until:  # not opened meanwhile by a failure here
                        self._clean_until[key] = time.monotonic() + CACHE
                    return change
        finally:
            self._ok_busy.discard(key)

    async def _tell(self, topic: Topic, op: str, error: str) -> Change | None:
        try:
            verdict, member = await self._ask(topic, op, error)
        except Exception as exc:
            self._down(topic, exc)
            return None
        if verdict == "opened":
            self._closed_until.pop(topic.topic, None)
            log.warning("circuit breaker of topic %s opened after %d failures in a row (%s); "
                        "its jobs wait %d s for a probe", topic.topic, topic.breaker_threshold,
                        error, topic.breaker_cooloff)
            return Change(topic.topic, "open", str(member))
        if verdict == "closed" and member:
            log.warning("circuit breaker of topic %s closed: a call succeeded", topic.topic)
            return Change(topic.topic, "close", str(member))
        if verdict == "open":
            self._closed_until.pop(topic.topic, None)
        return None
