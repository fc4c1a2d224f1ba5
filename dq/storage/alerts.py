"""Mails owed in Redis and the topics' circuit breakers (dq/storage/lua/breaker.lua).

A dead letter's alert mail is owed (the alerts zset) until sent, and so is each mail of a
breaker's opening and closing (the breaker mail zset on the topic's home shard). The
process that made one owed has a head start to send it; after that a sweep claims it
for as long (alert_claim.lua), so a crashed or failing sender's mail is still sent once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dq.sharding.shards import Shard
from dq.storage.stats import pairs

if TYPE_CHECKING:
    from dq.storage.store import Store

# A dead letter's alert mail is owed until sent (the alerts zset): the burying consumer
# has this head start (ms) before a sweep may mail it, and a sweep's claim lasts as long.
# (Read when used: the tests shorten it.)
ALERT_HEAD_START_MS = 5 * 60 * 1000


class Alerts:
    """The owed mails and the breakers of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    def breaker_home(self, topic: str) -> Shard:
        """The shard that keeps `topic`'s breaker: the topic key's rendezvous owner, the
        same for every dq instance with the same shards."""
        return self.store.shards.owner(topic)

    async def breaker(self, topic: str, op: str, *, threshold: int, cooloff_ms: int,
                      probe_ms: int, error: str = "") -> tuple[str, Any]:
        """Ask or tell the topic's breaker (dq/storage/lua/breaker.lua): (verdict, detail)."""
        shard = self.breaker_home(topic)
        res = await shard.script("breaker", (self.keys.breaker(topic), self.keys.breaker_mail), (
            op, threshold, cooloff_ms, probe_ms, ALERT_HEAD_START_MS, topic, error[:500]))
        verdict = res[0].decode()
        detail = res[1] if len(res) > 1 else None
        return verdict, detail.decode() if isinstance(detail, bytes) else detail

    async def breaker_state(self, topic: str) -> dict[str, int | str]:
        """The topic's breaker as kept: state (closed|open), fails in a row, opened (ms),
        opens and closes (counts); {} when it never counted anything."""
        raw = await self.breaker_home(topic).call("HGETALL", self.keys.breaker(topic))
        out: dict[str, int | str] = {}
        for k, v in pairs(raw):
            text = v.decode()
            out[k] = int(text) if text.lstrip("-").isdigit() else text
        return out

    async def owed_breaker_mails(self, shard: Shard, limit: int = 20) -> list[str]:
        """Breaker mails on `shard` still owed after their head start, claimed for a while
        as `owed_alerts` does: mail each, then `breaker_mail_done`."""
        got = await shard.script("alert_claim", (self.keys.breaker_mail,),
                                 (limit, ALERT_HEAD_START_MS))
        return [m.decode() for m in got]

    async def breaker_mail_done(self, topic: str, member: str, shard: Shard | None = None) -> None:
        await (shard or self.breaker_home(topic)).call("ZREM", self.keys.breaker_mail, member)

    async def owed_alerts(self, shard: Shard, limit: int = 20) -> list[str]:
        """Dead letters on `shard` whose alert mail is owed and whose burying consumer's
        head start is over (it died, was stopped, or the mail server failed), claimed for
        ALERT_HEAD_START_MS: mail each, then `alert_done`."""
        got = await shard.script("alert_claim", (self.keys.alerts,), (limit, ALERT_HEAD_START_MS))
        return [t.decode() for t in got]

    async def alert_done(self, shard: Shard, tid: str) -> None:
        """The alert mail of dead letter `tid` is sent, or not owed any more."""
        await shard.call("ZREM", self.keys.alerts, tid)
