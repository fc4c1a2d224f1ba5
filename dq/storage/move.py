"""dq-move: move a store's pending jobs onto other shards, e.g. from one Redis onto a
Redis Cluster, with their due times, versions and attempt counts.

It reuses the guests machinery (dq/storage/guests.py), which moves a job between shards in
crash-safe steps (take, land on the owner, drop, commit; each an atomic script):
every pending job of the source is made a guest there, and the destination's owners
(rendezvous over the destination's shards, a cluster's partitions) take them in. Ready and
in-flight jobs are first put back in their delay buckets, due now (park.lua), since only a
delayed job can be taken. Dead letters stay on the source (look at them, redrive them
there first if wanted). The source must no longer be worked by a dq (point dq at the
destination first): what a dq still delivers there is not moved. Safe to interrupt and
to run again: a later run finishes or undoes a move left midway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dq.config import Settings
from dq.sharding.shards import Shard, ShardSet
from dq.storage.guests import GuestMover
from dq.storage.jobs import Claimed, FlowLimit, split_tid
from dq.storage.payload import version_of
from dq.storage.store import Store

log = logging.getLogger("dq.move")

BATCH = 500


@dataclass
class Moved:
    """What one source shard's move did."""

    shard: str
    moved: int = 0
    requeued: int = 0  # ready or in-flight jobs put back in their buckets to be moved
    dead_left: int = 0  # dead letters, left on the source
    left: int = 0  # pending jobs still on the source after the run (should be 0)
    outcomes: collections.Counter[str] | None = None


def _store(urls: Sequence[str], settings: Settings) -> Store:
    shards = ShardSet.from_urls(urls, command_timeout=settings.redis_timeout,
                                cluster_partitions=settings.cluster_partitions)
    return Store(shards, prefix=settings.prefix, buckets=settings.buckets, zone=settings.zone)


async def requeue(src: Store, shard: Shard) -> int:
    """Ready (held back by flow control too) and in-flight jobs on `shard` back in their
    delay buckets, due now."""
    n = 0
    # Jobs a flow-controlled topic held back (claim.lua's held lists) are ready too:
    # claimed with no limit, so they are put back as well.
    held = [FlowLimit(topic=t) for t in sorted(await src.stats.held_topics(shard))]
    while True:
        claimed = await src.claim(shard, BATCH, (1, 2, 3), 60_000, held)
        if not claimed:
            break
        n += sum(await asyncio.gather(*(src.park(c, 0) for c in claimed)))
    tids = [t.decode() for t in await shard.call("ZRANGE", src.keys.inflight, 0, -1)]
    for tid in tids:
        raw = await shard.call("HGET", src.keys.jobs, tid)
        if raw is None:
            continue
        topic, job_id = split_tid(tid)
        leased = Claimed(shard=shard, tid=tid, topic=topic, id=job_id,
                         version=version_of(raw), priority=2, attempt=0, due_ms=0,
                         set_ms=0, body={}, claimed_ms=0)
        n += await src.park(leased, 0)
    return n


async def mark_guests(src: Store, shard: Shard) -> None:
    """Every job on `shard` a guest there (its owner is elsewhere now)."""
    cursor = 0
    while True:
        cursor, flat = await shard.call("HSCAN", src.keys.jobs, cursor, "COUNT", BATCH)
        cursor = int(cursor)
        tids = flat[::2]
        if tids:
            await shard.call("SADD", src.keys.guests, *tids)
        if not cursor:
            return


async def pending_left(src: Store, shard: Shard) -> tuple[int, int]:
    """(jobs still on `shard` that are not dead letters, dead letters)."""
    jobs, dead = await asyncio.gather(shard.call("HLEN", src.keys.jobs),
                                      shard.call("ZCARD", src.keys.dead))
    return int(jobs) - int(dead), int(dead)


async def move(from_urls: Sequence[str], to_urls: Sequence[str], settings: Settings, *,
               wait: float = 60.0) -> list[Moved]:
    """Move every pending job of the shards at `from_urls` onto the shards at `to_urls`
    (same prefix and buckets); per source shard, what was done."""
    src, dst = _store(from_urls, settings), _store(to_urls, settings)
    mover = GuestMover(dst)
    out = []
    try:
        await dst.shards.load_scripts()
        for shard in src.shards.shards:
            report = Moved(shard.label, outcomes=collections.Counter())
            report.requeued = await requeue(src, shard)
            await mark_guests(src, shard)
            deadline = time.monotonic() + wait
            while True:
                counts = await mover.sweep(shard, lambda s: True)
                assert report.outcomes is not None
                report.outcomes.update(counts)
                report.left, report.dead_left = await pending_left(src, shard)
                if not report.left or time.monotonic() >= deadline:
                    break
                if not sum(counts.values()):
                    await mark_guests(src, shard)  # added meanwhile: a dq still adds here
                await asyncio.sleep(0.2)
            report.moved = report.outcomes.get("moved", 0)
            log.info("dq-move: %s: %s", shard.label, dict(report.outcomes))
            out.append(report)
    finally:
        await src.shards.close()
        await dst.shards.close()
    return out
