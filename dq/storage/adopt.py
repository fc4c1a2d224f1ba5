"""Adopting php-delayqueue's pending jobs: what the original left in its Redis at cut-over
is moved into dq's layout on the same shard, and delivered by dq.

The original (DqRedis.php, DqConf::$prefix "dq_" by default) keeps each job's body JSON,
notify_time and dq_set_time included, in the hash `dq_job_info` under `<topic>:<id>`; the
job waits in the zset `dq_bucket_<crc32(topic) % $bucket>` scored by its due time in epoch
seconds, and its timer moves due jobs to the list `dq_<priority>ready_queue`, whose
consumers deliver them. Its shard is `crc32(tid) % N` over the `dq_redis` rows.

dq adopts them on every shard it works, each job in one atomic script (dq/storage/lua/adopt.lua)
that removes it from the original's keys and writes it into dq's: ready jobs first (due
now), then every bucket (due when the original would have delivered them), then bodies in
neither (a job the original popped and lost in a crash: due now). A job keeps its body
and due time, gets its topic's priority, and its failed attempts so far
(`exp_notify_nums`). It stays on the shard the original put it on; where dq's owner of
the tid is another shard, it is a guest that the checker moves home (dq/storage/guests.py).

Adopting is safe beside traffic and beside other adopters: a job added (or deleted)
through dq meanwhile wins over the original's stale copy, on this shard (the script
looks) and on its owner (looked up before, and the guest move keeps the owner's copy,
whose add time is later than the original's dq_set_time).

The checker runs a pass at start and then every ADOPT_EVERY seconds (one EXISTS per
shard when there is nothing); `dq-adopt` runs one by hand.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from dq.errors import DqError
from dq.sharding.shards import Shard
from dq.storage.store import Store

log = logging.getLogger("dq.adopt")

ADOPT_EVERY = 30.0  # seconds between the checker's looks for the original's jobs
BATCH = 200  # jobs per script call
STALLS = 20  # passes over a list that moved nothing before it is left for the next round
OUTCOMES = ("adopted", "superseded", "gone", "changed", "raced")


class Adopter:
    """Adopts the original's jobs on a store's shards (see the module doc)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def pending(self, shard: Shard) -> bool:
        return await self.store.original.pending(shard)

    async def adopt_all(self, priorities: Mapping[str, int], *,
                        every: bool = False) -> dict[str, collections.Counter[str]]:
        """One pass over every shard (only those that may hold the original's jobs,
        unless `every`): the counts per shard label. A shard that fails is logged and
        left for the next pass."""
        out: dict[str, collections.Counter[str]] = {}
        for shard in self.store.shards.shards:
            try:
                if every or await self.pending(shard):
                    out[shard.label] = await self.adopt_shard(shard, priorities)
            except DqError as exc:
                log.warning("adopting php-delayqueue's jobs on shard %s failed (%s); "
                            "trying again later", shard.label, exc)
        return out

    async def adopt_shard(self, shard: Shard,
                          priorities: Mapping[str, int]) -> collections.Counter[str]:
        """Adopt every job the original left on `shard`; the outcomes, counted (adopted
        also per source: ready, delayed, orphan). Logs one line when it moved any."""
        st = self.store
        counts = collections.Counter[str]()
        ready, buckets = await st.original.queues(shard)
        for key, prio in ready:
            await self._drain_ready(shard, key, prio, priorities, counts)
        for key in buckets:
            await self._drain_bucket(shard, key, priorities, counts)
        await self._orphans(shard, buckets, priorities, counts)
        if counts["adopted"] or counts["superseded"] or counts["gone"]:
            log.info("adopted %d job(s) php-delayqueue left on shard %s (%d ready, %d delayed, "
                     "%d in no queue); %d added again through dq meanwhile kept dq's copy, %d "
                     "ready entries without a body dropped", counts["adopted"], shard.label,
                     counts["ready"], counts["delayed"], counts["orphan"], counts["superseded"],
                     counts["gone"], extra={"shard": shard.label, "adopted": counts["adopted"]})
        if counts["changed"]:
            log.warning("shard %s: %d job(s) of php-delayqueue changed while being adopted "
                        "(is its dq-master still running?); they are adopted on a later pass",
                        shard.label, counts["changed"])
        return counts

    async def _drain_ready(self, shard: Shard, key: str, prio: int,
                           priorities: Mapping[str, int], counts: collections.Counter[str],
                           ) -> None:
        st, stalls = self.store, 0
        while stalls < STALLS:
            tids = [t.decode() for t in await shard.call("LRANGE", key, 0, BATCH - 1)]
            if not tids:
                return
            bodies = await shard.call("HMGET", st.keys.orig_jobs, *tids)
            jobs = await self._jobs(shard, list(zip(tids, bodies, [""] * len(tids),
                                                    strict=True)), priorities, prio)
            res = await st.original.adopt(shard, "ready", key, (), jobs)
            self._count(counts, res, "ready")
            # a body written again between read and script: read again, a few times
            stalls = stalls + 1 if res[3] else 0

    async def _drain_bucket(self, shard: Shard, key: str, priorities: Mapping[str, int],
                            counts: collections.Counter[str]) -> None:
        st, start = self.store, 0
        while True:
            flat = await shard.call("ZRANGE", key, start, start + BATCH - 1, "WITHSCORES")
            if not flat:
                return
            tids = [flat[i].decode() for i in range(0, len(flat), 2)]
            scores = [flat[i].decode() for i in range(1, len(flat), 2)]
            bodies = await shard.call("HMGET", st.keys.orig_jobs, *tids)
            jobs = await self._jobs(shard, list(zip(tids, bodies, scores, strict=True)),
                                    priorities, 2)
            res = await st.original.adopt(shard, "bucket", key, (), jobs)
            self._count(counts, res, "delayed")
            start += res[3]  # jobs written again since read stay ahead: the next pass

    async def _orphans(self, shard: Shard, buckets: Sequence[str],
                       priorities: Mapping[str, int], counts: collections.Counter[str]) -> None:
        """Bodies in none of the original's lists: the original had popped them and died
        before delivering (it deletes a body before calling back), so it never would."""
        st, cursor = self.store, 0
        while True:
            cursor, flat = await shard.call("HSCAN", st.keys.orig_jobs, cursor, "COUNT", BATCH)
            found = [(flat[i].decode(), flat[i + 1], "") for i in range(0, len(flat), 2)]
            if found:
                jobs = await self._jobs(shard, found, priorities, 2)
                self._count(counts, await st.original.adopt(shard, "orphan", st.keys.orig_jobs,
                                                            buckets,
                                                   jobs), "orphan")
            cursor = int(cursor)
            if not cursor:
                return

    @staticmethod
    def _count(counts: collections.Counter[str], res: list[int], source: str) -> None:
        for name, n in zip(OUTCOMES, res, strict=True):
            counts[name] += n
        counts[source] += res[0]

    async def _jobs(self, shard: Shard, found: list[tuple[str, bytes | None, str]],
                    priorities: Mapping[str, int], fallback: int,
                    ) -> list[tuple[str, bytes, str, int, int, int, int]]:
        """The adopt script's arguments for jobs read from the original's keys."""
        st = self.store
        whose = [0 if st.shards.owner(tid) is shard else 1 for tid, _, _ in found]
        # An owner that holds the job already (added through dq since cut-over) keeps it.
        guests = [i for i, w in enumerate(whose) if w]
        held = await asyncio.gather(*(st.shards.owner(found[i][0]).call(
            "HEXISTS", st.keys.jobs, found[i][0]) for i in guests), return_exceptions=True)
        for i, h in zip(guests, held, strict=True):
            if h == 1:
                whose[i] = 2
        out = []
        for (tid, body, score), w in zip(found, whose, strict=True):
            prio = priorities.get(tid.partition(":")[0], fallback)
            attempt, set_ms = self._facts(body)
            out.append((tid, body or b"", score, prio if prio in (1, 2, 3) else 2, attempt,
                        set_ms, w))
        return out

    def _facts(self, body: bytes | None) -> tuple[int, int]:
        """(failed attempts so far, added at ms) read off the original's body: its
        exp_notify_nums and dq_set_time ('Y-m-d H:i:s' in the configured zone); 0 for what
        it lacks (set 0: any add through dq is newer)."""
        try:
            data: Any = json.loads(body) if body else None
        except ValueError:
            return 0, 0
        if not isinstance(data, dict):
            return 0, 0
        attempt = data.get("exp_notify_nums")
        attempt = attempt if type(attempt) is int and 0 <= attempt < 1000 else 0
        try:
            at = datetime.strptime(str(data.get("dq_set_time")), "%Y-%m-%d %H:%M:%S")
            set_ms = int(at.replace(tzinfo=self.store.zone).timestamp() * 1000)
        except ValueError:
            set_ms = 0
        return attempt, max(0, set_ms)
