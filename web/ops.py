"""Read-outs both the pages and the API show: shard health, topic counters, job views."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from redis.exceptions import RedisError

from dq.errors import DqError
from dq.registry.core import Topic
from dq.sharding.refusals import safe_name
from dq.sharding.shards import Shard, ShardSet
from dq.storage.payload import BadPayload
from dq.storage.stats import STAT_FIELDS
from dq.storage.store import JobInfo, Store
from web.forms import mask_url
from web.state import WebState, db

log = logging.getLogger(__name__)

PROBE_TIMEOUT: Final = 3.0


@dataclass
class ShardView:
    """One shard as the console shows it, with what a live probe found."""

    id: int | None  # the registry row; None for shards from the config file
    name: str
    url: str  # password masked
    source: str  # config | embedded | console
    enabled: bool
    in_use: bool  # this process already uses it (workers pick up console shards on reload,
    # which each dq-master's checker starts when the registry's shard list changes)
    up: bool = False
    error: str = ""
    version: str = ""
    memory: str = ""
    depths: dict[str, int] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return asdict(self)


async def probe(store: Store, shard: Shard, view: ShardView) -> dict[str, str]:
    """Fill in liveness (PING), version, used memory and job counts; INFO's fields."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await shard.call("PING")
            info, depths = await asyncio.gather(shard.call("INFO"), store.stats.depths(shard))
    except (DqError, RedisError, OSError, TimeoutError) as exc:
        view.error = safe_name(str(exc)) or exc.__class__.__name__
        if isinstance(exc, TimeoutError):
            view.error = f"no answer within {PROBE_TIMEOUT:g} s"
        return {}
    view.up = True
    view.depths = depths
    fields = parse_info(info)
    view.version = fields.get("redis_version", "")
    view.memory = fields.get("used_memory_human", "")
    return fields


async def probe_cluster(store: Store, parts: list[Shard], view: ShardView) -> None:
    """A Redis Cluster's partitions, shown as one shard: up when every partition answers
    (else the first one's error), job counts summed over the partitions, memory summed
    over the masters that serve them."""
    views = [ShardView(None, p.name, "", "", True, True) for p in parts]
    infos = await asyncio.gather(*(probe(store, p, v) for p, v in zip(parts, views,
                                                                        strict=True)))
    down = [v for v in views if not v.up]
    view.up = not down
    view.error = f"{len(down)} of {len(views)} partitions: {down[0].error}" if down else ""
    for v in views:
        for state, n in v.depths.items():
            view.depths[state] = view.depths.get(state, 0) + n
    view.version = next((v.version for v in views if v.version), "")
    used: dict[Any, int] = {}
    for part, info in zip(parts, infos, strict=True):
        node = getattr(part.conn, "node_addr", None)
        if info.get("used_memory", "").isdigit() and node is not None:
            used[node] = int(info["used_memory"])
    if used:
        view.memory = f"{sum(used.values()) / 2**20:.2f}M on {len(used)} masters"


def parse_info(info: Any) -> dict[str, str]:
    """INFO's reply as field -> value, whether it arrives raw or already parsed."""
    if isinstance(info, dict):
        return {str(k): str(v) for k, v in info.items()}
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


async def shard_views(st: WebState) -> list[ShardView]:
    """Every shard this process uses plus every shard stored in the registry, probed."""
    confs = await db(st.registry.shards)
    # A Redis Cluster's partitions share its URL: one view each URL
    active: dict[str, list[Shard]] = {}
    for s in st.store.shards.shards:
        active.setdefault(s.url, []).append(s)
    stored = {c.url for c in confs}
    views: list[tuple[ShardView, list[Shard], bool]] = []
    for url, shards in active.items():
        if url in stored:
            continue
        source = "config" if url in st.settings.redis else "embedded"
        name = shards[0].name if len(shards) == 1 else url
        name = mask_url(name) if "://" in name else name  # config shards are named by URL
        views.append((ShardView(None, name, mask_url(url), source, True, True), shards, False))
    for c in confs:
        found = active.get(c.url)
        temp = found is None
        if found is None:
            found = ShardSet.from_urls([(c.name, c.url)], connect_timeout=1.0,
                                       command_timeout=PROBE_TIMEOUT,
                                       cluster_partitions=st.settings.cluster_partitions,
                                       ).shards
        views.append((ShardView(c.id, c.name, mask_url(c.url), "console", c.enabled,
                                not temp), found, temp))
    try:
        await asyncio.gather(*(probe(st.store, shards[0], v) if len(shards) == 1
                               else probe_cluster(st.store, shards, v)
                               for v, shards, _ in views))
    finally:
        await asyncio.gather(*(s.close() for _, shards, temp in views if temp for s in shards),
                             return_exceptions=True)
    return [v for v, _, _ in views]


async def topic_counters(store: Store, topics: list[Topic]) -> list[dict[str, Any]]:
    """Per topic: today's and all-time writes, notifies, ok, fail, retries, dead, dels."""
    stats = await asyncio.gather(*(store.stats.topic_stats(t.topic) for t in topics))
    day = store.clock.day()
    return [{"topic": t.topic, "name": t.name, "online": t.online,
             "today": {f: s.get(f"{f}:{day}", 0) for f in STAT_FIELDS},
             "total": {f: s.get(f, 0) for f in STAT_FIELDS}}
            for t, s in zip(topics, stats, strict=True)]


def job_json(store: Store, info: JobInfo) -> dict[str, Any]:
    error = info.error
    if isinstance(error, dict) and type(error.get("at")) is int:
        error = {**error, "at_time": store.clock.fmt_time(error["at"])}
    return {"topic": info.topic, "id": info.id, "shard": info.shard, "state": info.state,
            "due_ms": info.due_ms, "due": store.clock.fmt_time(info.due_ms),
            "attempts": info.attempt, "priority": info.priority, "body": info.body,
            "error": error, "retrying": info.retrying,
            "next_attempt": store.clock.fmt_time(info.due_ms) if info.retrying else None}


def search_topics(topics: dict[str, Topic], q: str) -> list[Topic]:
    """Topics whose key or name contains q (case-insensitive), by key."""
    needle = q.strip().lower()
    found = [t for t in topics.values()
             if not needle or needle in t.topic.lower() or needle in t.name.lower()]
    return sorted(found, key=lambda t: t.topic)


async def redrive_all(store: Store, topic: str | None, limit: int = 10_000) -> int:
    """Redrive every dead letter (of one topic); returns how many were redriven."""
    dead = await store.dead_letters(topic or None, limit=limit)
    done = 0
    for i in range(0, len(dead), 100):
        chunk = dead[i:i + 100]
        results = await asyncio.gather(*(store.redrive(j.topic, j.id) for j in chunk),
                                       return_exceptions=True)
        for r in results:  # one whose stored job cannot be read is left as it is
            if isinstance(r, BaseException) and not isinstance(r, BadPayload):
                raise r
        done += sum(r is True for r in results)
    return done


async def _breaker(store: Store, topic: str) -> dict[str, int | str]:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await store.alerts.breaker_state(topic)
    except (DqError, RedisError, OSError, TimeoutError):
        return {"state": "unknown"}


async def breaker_states(store: Store, topics: list[Topic]) -> dict[str, dict[str, int | str]]:
    """The circuit breakers of the topics that have one (breaker_threshold > 0), by topic:
    state closed | open (| unknown when its home shard does not answer), fails in a row,
    opened (epoch ms), opens and closes (counts). One never used reads as closed."""
    keys = [t.topic for t in topics if t.breaker_threshold]
    found = await asyncio.gather(*(_breaker(store, k) for k in keys))
    return {k: {"state": "closed", "fails": 0, "opens": 0, "closes": 0, **b}
            for k, b in zip(keys, found, strict=True)}
