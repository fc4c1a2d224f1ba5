"""Statistics: the counters the scripts bump (per topic, per day, per minute), the delivery
histograms, and what the console reads of them and of a shard's depths."""

from __future__ import annotations

import asyncio
import bisect
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dq.errors import DqError
from dq.sharding.shards import Shard

if TYPE_CHECKING:
    from dq.storage.jobs import Claimed
    from dq.storage.store import Store

MINUTE_TTL = 2 * 3600  # per-minute counters feed the console's last-hour chart
STAT_FIELDS = ("writes", "notifies", "ok", "fail", "retries", "dead", "dels")
# Upper bounds (seconds) of the delivery histograms' buckets; +Inf is implied.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0)
CALLBACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HISTOGRAMS = {"late": LATENESS_BUCKETS, "cb": CALLBACK_BUCKETS}


def pairs(flat: list[bytes]) -> list[tuple[str, bytes]]:
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


def observe(c: Claimed, took_ms: int | None) -> tuple[Any, ...]:
    """Histogram increments for one callback attempt (none when no call was made):
    lateness = claim time on the shard's clock minus the due time, and the call's
    duration. Each lands in one bucket field; Prometheus's cumulative `le` buckets are
    summed up when read (`Stats.histograms`)."""
    if took_ms is None:
        return ()
    late_ms = max(0, c.claimed_ms - c.due_ms)
    took_ms = max(0, int(took_ms))
    return (_hist_field("late", late_ms), 1, "late:sum_ms", late_ms,
            _hist_field("cb", took_ms), 1, "cb:sum_ms", took_ms)


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


class Stats:
    """What a store's shards count, read back (summed over the shards where it says)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys = store.keys

    async def topic_stats(self, topic: str) -> dict[str, int]:
        """Counters of one topic summed over the reachable shards (totals and per day)."""
        total: dict[str, int] = {}
        for shard in self.store.shards.shards:
            try:
                raw = await shard.call("HGETALL", self.keys.stat(topic))
            except DqError:
                continue
            for k, v in pairs(raw):
                total[k] = total.get(k, 0) + int(v)
        return total

    async def stat_epoch(self, shard: Shard) -> str:
        """The token of the shard's Redis dataset (made on first use): a Redis emptied
        since gets a new one, so counters exported from it start from zero
        (dq/roles/statexport.py)."""
        token = await shard.call("GET", self.keys.stat_epoch)
        if token is None:
            await shard.call("SET", self.keys.stat_epoch, secrets.token_hex(8), "NX")
            token = await shard.call("GET", self.keys.stat_epoch)
        return str(token.decode())

    async def stat_values(self, shard: Shard, topics: Sequence[str],
                          fields: Sequence[str]) -> dict[str, list[int]]:
        """These counters of these topics on one shard (0 for those never bumped)."""
        rows = await asyncio.gather(*(shard.call("HMGET", self.keys.stat(t), *fields)
                                      for t in topics))
        return {t: [int(v) if v is not None else 0 for v in row]
                for t, row in zip(topics, rows, strict=True)}

    async def histograms(self, topic: str) -> dict[str, Histogram]:
        """The topic's delivery histograms summed over the reachable shards:
        "late" (due -> call) and "cb" (call duration), in seconds."""
        raw: dict[str, int] = {}
        for shard in self.store.shards.shards:
            try:
                flat = await shard.call("HGETALL", self.keys.hist(topic))
            except DqError:
                continue
            for k, v in pairs(flat):
                raw[k] = raw.get(k, 0) + int(v)
        return {name: _histogram(name, bounds, raw) for name, bounds in HISTOGRAMS.items()}

    async def minute_stats(self, minutes: int = 60) -> list[tuple[int, dict[str, int]]]:
        """(epoch minute, counters) for the last `minutes` minutes, summed over shards."""
        now_min = int(time.time() // 60)
        mins = list(range(now_min - minutes + 1, now_min + 1))
        out = {m: {"writes": 0, "ok": 0, "fail": 0} for m in mins}
        for shard in self.store.shards.shards:
            try:
                rows = await asyncio.gather(*(shard.call("HGETALL", self.keys.minute(m))
                                              for m in mins))
            except DqError:
                continue
            for m, row in zip(mins, rows, strict=True):
                for k, v in pairs(row):
                    out[m][k] = out[m].get(k, 0) + int(v)
        return [(m, out[m]) for m in mins]

    async def depths(self, shard: Shard) -> dict[str, int]:
        """How many jobs a shard holds in each state, and how many of them are guests
        (their owner is another shard; moved home once it answers)."""
        k = self.keys
        counts = await asyncio.gather(
            shard.call("HLEN", k.jobs),
            *(shard.call("ZCARD", d) for d in k.delay),
            *(shard.call("LLEN", r) for r in k.ready),
            shard.call("ZCARD", k.inflight),
            shard.call("ZCARD", k.dead),
            shard.call("SCARD", k.guests),
        )
        nb = k.buckets
        # Ready jobs held back by their topic's flow control count as ready.
        held = await asyncio.gather(*(shard.call("LLEN", k.held(t))
                                      for t in sorted(await self.held_topics(shard))))
        return {
            "jobs": int(counts[0]),
            "delayed": sum(int(c) for c in counts[1:1 + nb]),
            "ready": sum(int(c) for c in counts[1 + nb:4 + nb]) + sum(int(h) for h in held),
            "inflight": int(counts[4 + nb]),
            "dead": int(counts[5 + nb]),
            "guests": int(counts[6 + nb]),
        }

    async def held_topics(self, shard: Shard) -> set[str]:
        """The topics that may have jobs in a held list on `shard`."""
        return {t.decode() for t in await shard.call("SMEMBERS", self.keys.held_set)}

    async def flow_totals(self, topic: str) -> dict[str, int] | None:
        """A topic's calls in flight (counted for its concurrency) and held jobs, summed
        over the shards; None when a shard did not answer (no value rather than a wrong one)."""
        total = {"inflight": 0, "held": 0}
        for shard in self.store.shards.shards:
            try:
                state = await self.flow_state(shard, topic)
            except DqError:
                return None
            total["inflight"] += int(state["inflight"])
            total["held"] += int(state["held"])
        return total

    async def flow_state(self, shard: Shard, topic: str) -> dict[str, float]:
        """A topic's flow state on `shard`: tokens, calls in flight, jobs held."""
        tok, n = await shard.call("HMGET", self.keys.flow, f"{topic}|tok", f"{topic}|n")
        held = await shard.call("LLEN", self.keys.held(topic))
        return {"tokens": float(tok or 0), "inflight": int(n or 0), "held": int(held)}
