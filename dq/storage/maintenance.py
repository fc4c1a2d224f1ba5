"""Upkeep of a store's shards that no client asks for: delayed jobs kept in the buckets the
`buckets` setting gives them, expired leases given back, a retired shard's jobs made
guests. Run by the timer and the checker (dq/roles)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dq.sharding.shards import Shard
from dq.storage.stats import pairs

if TYPE_CHECKING:
    from dq.storage.store import Store

log = logging.getLogger("dq.store")

# After the `buckets` setting changes, the delayed jobs are moved to their new buckets
# (Maintenance.rebucket), and gone through again on later calls for this long: processes
# still on the old setting (a reload's draining generation) may add a few more meanwhile.
REBUCKET_AGAIN_MS = 10 * 60 * 1000
REBUCKET_BATCH = 500


class Maintenance:
    """The upkeep steps of one store, each on one shard."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def requeue_expired(self, shard: Shard, limit: int = 1000) -> int:
        """Put jobs whose lease ran out back at the head of their ready lists, each with one
        more attempt counted (the delivery cut off); how many."""
        k = self.keys
        keys = (k.jobs, k.inflight, *k.ready, k.flow, k.flow_lease)
        return int(await shard.script("requeue_expired", keys, (limit,)))

    async def retire(self, shard: Shard, batch: int = 500) -> int:
        """Record every job on a retired shard (one that takes no adds) as a guest, so it
        is moved home to its owner like any guest (dq/storage/guests.py); dead letters stay.
        Returns how many were newly recorded. A job written there after the pass (by an
        older generation still routing to it) is caught by the next pass."""
        cursor, added = b"0", 0
        k = self.keys
        while True:
            cursor, n = await shard.script("retire", (k.jobs, k.guests, k.dead), (cursor, batch))
            added += int(n)
            if cursor in (b"0", 0, "0"):
                return added

    async def rebucket(self, shard: Shard) -> int:
        """Keep every delayed job in the bucket `buckets` gives it (crc32(tid) % buckets)
        after that setting changed: otherwise a timer would never look at a bucket beyond
        the new count, and a job added again, or deleted, would leave its old entry to
        fire. The shard records the count in force ({prefix}layout); when it differs from
        this store's, every bucket that may hold jobs is gone through and each misplaced
        job moved (rebucket.lua), and again on each call for REBUCKET_AGAIN_MS. Cheap
        otherwise (one HGETALL). Returns how many jobs moved."""
        most = await self._buckets_to_scan(shard)
        moved = 0
        for b in range(most):
            moved += await self._rebucket_one(shard, b)
        if moved:
            log.warning("shard %s: %d delayed job(s) moved to their buckets", shard.label, moved)
        return moved

    async def _buckets_to_scan(self, shard: Shard) -> int:
        """How many buckets `rebucket` must go through on `shard` (0: none), recording
        a change of the setting first: a pass cut short is done again by the next call."""
        n, layout = self.keys.buckets, self.keys.layout
        rec = {k: int(v) for k, v in pairs(await shard.call("HGETALL", layout))}
        now_ms = int(time.time() * 1000)
        if not rec:
            # A new shard, or one written before dq kept this record: the delay buckets
            # it has tell (dq's keys are few: jobs are fields of one hash).
            most = max([n, *(b + 1 for b in await self._delay_buckets(shard))])
            rec = {"buckets": most if most > n else n, "most": most}
            if most == n:
                await shard.call("HSET", layout, "buckets", n, "most", n, "changed", 0)
                return 0
        cur, most, changed = rec.get("buckets", n), rec.get("most", n), rec.get("changed", 0)
        if cur == n and now_ms - changed > REBUCKET_AGAIN_MS:
            return 0
        most = max(most, cur, n)
        if cur != n:
            log.warning("shard %s: the buckets setting changed from %d to %d; moving its "
                        "delayed jobs to their new buckets", shard.label, cur, n)
            await shard.call("HSET", layout, "buckets", n, "most", most, "changed", now_ms)
        return most

    async def _rebucket_one(self, shard: Shard, b: int) -> int:
        """Move the misplaced jobs of delay zset number `b` to their buckets; how many."""
        k = self.keys
        key, cursor, moved = k.delay_of(b), 0, 0
        while True:
            cursor, flat = await shard.call("ZSCAN", key, cursor, "COUNT", REBUCKET_BATCH)
            keys: list[str] = [k.jobs, key]
            args: list[Any] = []
            for tid, score in pairs(flat):
                nb = k.bucket(tid)
                if nb != b:
                    keys += (k.delay[nb], k.wake[nb])
                    args += (tid, score)
            if args:
                moved += int(await shard.script("rebucket", keys, args))
            cursor = int(cursor)
            if not cursor:
                return moved

    async def _delay_buckets(self, shard: Shard) -> list[int]:
        """The bucket numbers of the delay zsets `shard` holds."""
        pattern = self.keys.delay_pattern()
        found, cursor = [], 0
        while True:
            cursor, keys = await shard.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found += [int(s) for k in keys if (s := k.decode().rpartition(":")[2]).isdigit()]
            cursor = int(cursor)
            if not cursor:
                return found
