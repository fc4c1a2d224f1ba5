"""php-delayqueue's layout as dq reads it: the jobs the original left in its Redis, which
dq adopts (dq/storage/adopt.py) and shows through `get` until then."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dq import fastjson
from dq.sharding.shards import Shard
from dq.storage.payload import new_version

if TYPE_CHECKING:
    from dq.storage.store import Store


class Original:
    """The original's keys on a store's shards (none looked for without `orig_prefix`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def pending(self, shard: Shard) -> bool:
        """Whether `shard` may hold jobs in the original's layout (one EXISTS: cheap)."""
        k = self.keys
        if not k.orig_prefix:
            return False
        return int(await shard.call("EXISTS", k.orig_jobs,
                                    *(k.orig_ready(p) for p in (1, 2, 3)))) > 0

    async def queues(self, shard: Shard) -> tuple[list[tuple[str, int]], list[str]]:
        """The original's ready lists on `shard` (key, priority), priorities 1..3 first,
        and its bucket zsets: whatever DqConf's $bucket and the topics' priorities were."""
        k = self.keys
        ready_pat, bucket_pat = k.orig_patterns()
        ready: dict[str, int] = {k.orig_ready(p): p for p in (1, 2, 3)}
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
                        middle = key[len(k.orig_prefix):-len("ready_queue")]
                        ready[key] = int(middle) if middle.isdigit() else 2
                cursor = int(cursor)
                if not cursor:
                    break
        return list(ready.items()), sorted(set(buckets))

    async def body(self, tid: str) -> dict[str, Any] | None:
        """The body of a job the original left and dq has not adopted yet, as the
        original's `get` would show it; None when there is none, or it is no object."""
        if not self.keys.orig_prefix:
            return None
        found = await asyncio.gather(*(s.call("HGET", self.keys.orig_jobs, tid)
                                       for s in self.store.shards.shards),
                                     return_exceptions=True)
        for raw in found:
            if isinstance(raw, bytes):
                try:
                    body = fastjson.loads(raw)
                except ValueError:
                    continue
                if isinstance(body, dict):
                    return body
        return None

    async def adopt(self, shard: Shard, mode: str, source: str, checks: Sequence[str],
                    jobs: Sequence[tuple[str, bytes, str, int, int, int, int]]) -> list[int]:
        """Move jobs read from the original's `source` (see dq/storage/lua/adopt.lua) into
        dq's layout on `shard`. A job: (tid, body as read, score as read, priority,
        attempt, set ms, 0 owned | 1 guest | 2 the owner holds it). Returns [adopted,
        superseded, gone, changed, raced] (see the script)."""
        k = self.keys
        keys: list[str] = [k.orig_jobs, source, k.jobs, k.guests, *checks]
        args: list[Any] = [mode, len(checks)]
        for tid, body, score, priority, attempt, set_ms, whose in jobs:
            b = k.bucket(tid)
            keys += (k.delay[b], k.wake[b])
            args += (tid, body, score, new_version(), priority, attempt, set_ms, whose)
        return [int(n) for n in await shard.script("adopt", keys, args)]
