"""Exporting dq's counters to the original console's `dq_stat` rows, so its numbers keep
moving after cut-over and agree with dq's console.

php-delayqueue (DqRedis::incr_nums, redis_self_incr; DqModule::notify) buffers counters in
each process and adds them to `dq_stat` (`u_key`, `num`) every DqConf::$flush_incr_interval
(5) seconds with `insert ... on duplicate key update num=num+N`. Its keys, per topic
(`dq_topic.id`) and per shard (`dq_redis.id`), and the dq counters they follow:

| dq_stat u_key | the original counts | dq counter (dq:stat:<topic>) |
|---|---|---|
| `<id>:total_write`, `<id>:tw:<Ymd>` | every write: adds and retries' re-adds | writes + retries |
| `<id>:total_notfiy`, `<id>:tn:<Ymd>` | every callback attempt | notifies |
| `<id>:te:<Ymd>` | failed attempts | fail |
| `<id>:total_del`, `<id>:tdel:<Ymd>` | deletes by clients | dels |
| `redis:<rid>:dq_write_total_nums` | writes on that shard | writes + retries |
| `redis:<rid>:dq_notify_total_nums` | attempts on that shard | notifies |
| `redis:<rid>:dq_del_total_nums` | (read by its console, never written) | dels |

dq's scripts count in Redis as they go; the checker of each instance exports every
EXPORT_EVERY seconds what they gained since the last export (Registry.export_stats, one
transaction; several instances take turns and never count a gain twice). A counter's mark
is named by its Redis dataset's token (`Stats.stat_epoch`), so a shard renamed or moved
keeps its marks and a fresh (emptied) Redis starts from zero. Per-day counters are
exported for today and yesterday (in the configured time zone).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from dq.errors import DqError
from dq.registry.core import Registry
from dq.storage.store import Store

log = logging.getLogger("dq.stats")

EXPORT_EVERY = 5.0  # seconds, as the original's DqConf::$flush_incr_interval
# dq counter -> (the topic's dq_stat key, the shard's) for totals
TOTALS = {
    "writes": ("total_write", "dq_write_total_nums"),
    "retries": ("total_write", "dq_write_total_nums"),
    "notifies": ("total_notfiy", "dq_notify_total_nums"),  # sic, the original's spelling
    "dels": ("total_del", "dq_del_total_nums"),
}
# dq counter -> the topic's per-day dq_stat key prefix
DAILY = {"writes": "tw", "retries": "tw", "notifies": "tn", "fail": "te", "dels": "tdel"}

Counter = tuple[str, str, int, tuple[str, ...]]


class StatExporter:
    """Exports the counters of a store's shards to a registry's dq_stat."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self.exported = 0  # how many increments of dq_stat so far
        self._last: dict[str, int] = {}  # mark -> value at this exporter's last export

    def _days(self) -> tuple[str, str]:
        today = self.store.clock.day()
        d = datetime.strptime(today, "%Y%m%d") - timedelta(days=1)
        return today, d.strftime("%Y%m%d")

    async def counters(self) -> list[Counter]:
        """Every counter to export, with its value now; shards that do not answer are
        left for the next export."""
        topics = await asyncio.to_thread(self.registry.topics)
        rows = await asyncio.to_thread(self.registry.shards)
        shard_ids = {r.url: r.id for r in rows}
        days = self._days()
        fields = [*TOTALS, *(f"{name}:{d}" for d in days for name in DAILY)]
        out: list[Counter] = []
        for shard in self.store.shards.shards:
            try:
                token = await self.store.stats.stat_epoch(shard)
                values = await self.store.stats.stat_values(shard, list(topics), fields)
            except DqError as exc:
                log.debug("stat export: shard %s skipped: %s", shard.label, exc)
                continue
            rid = shard_ids.get(shard.url)
            for key, topic in topics.items():
                for field, value in zip(fields, values[key], strict=True):
                    if not value:
                        continue
                    name, _, day = field.partition(":")
                    if day:
                        targets: tuple[str, ...] = (f"{topic.id}:{DAILY[name]}:{day}",)
                    else:
                        mine, shards = TOTALS[name]
                        targets = (f"{topic.id}:{mine}",)
                        if rid is not None:
                            targets += (f"redis:{rid}:{shards}",)
                    out.append((f"{token}:{topic.id}:{field}", day, value, targets))
        return out

    async def export(self) -> dict[str, int]:
        """One export; what it added per dq_stat key."""
        counters = await self.counters()
        if all(self._last.get(mark) == value for mark, _, value, _ in counters):
            return {}  # nothing moved since this exporter's last export: no SQL
        added = await asyncio.to_thread(self.registry.export_stats, counters,
                                        oldest_day=self._days()[1])
        self._last = {mark: value for mark, _, value, _ in counters}
        self.exported += sum(added.values())
        if added:
            log.debug("stat export: %d dq_stat row(s) moved", len(added))
        return added
