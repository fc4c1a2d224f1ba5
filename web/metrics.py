"""/healthz (always open) and /metrics in Prometheus text format (open when
settings.metrics_public, else behind the API password).

Every number comes from Redis (counters and histograms are bumped by the Lua scripts), so
every console instance shows the same values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.exceptions import RedisError

from dq.errors import DqError
from dq.registry.core import Topic
from dq.sharding.shards import Shard
from dq.storage.store import Store
from web import schemas as s
from web.auth import require_api
from web.forms import mask_url
from web.ops import PROBE_TIMEOUT, breaker_states, shard_views, topic_counters
from web.state import WebState, db, state

router = APIRouter()


@router.get("/healthz", response_model=s.Health, tags=["health"])
async def healthz() -> dict[str, Any]:
    """Liveness of the console process; needs no password."""
    return {"status": "ok"}


class _Snapshot:
    """A collector that yields metric families computed before the scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Per-topic event counters and delivery histograms, per-shard job counts, memory and
    liveness, for Prometheus."""
    st = state(request)
    if not st.settings.metrics_public:
        await require_api(request)
    topics = list((await db(st.registry.topics)).values())
    events = CounterMetricFamily("dq_topic_events", "Job events per topic since counting began",
                                 labels=["topic", "event"])
    for row in await topic_counters(st.store, topics):
        for event, n in row["total"].items():
            events.add_metric([row["topic"], event], n)
    up = GaugeMetricFamily("dq_shard_up", "1 when the shard answered PING", labels=["shard"])
    jobs = GaugeMetricFamily("dq_shard_jobs", "Jobs on a shard by state",
                             labels=["shard", "state"])
    for view in await shard_views(st):
        up.add_metric([view.name], 1 if view.up else 0)
        for state_name, n in view.depths.items():
            jobs.add_metric([view.name, state_name], n)
    families = [events, up, jobs, await shard_memory(st),
                *await delivery_histograms(st.store, topics), *await breakers(st.store, topics),
                *await flow(st.store, topics)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def breakers(store: Store, topics: list[Topic]) -> list[Metric]:
    """Per topic with a circuit breaker: whether it is open now, and how often it opened
    and closed since counting began (kept in Redis, so every console agrees)."""
    gauge = GaugeMetricFamily("dq_breaker_open", "1 while the topic's circuit breaker is "
                              "open (its jobs wait), else 0", labels=["topic"])
    moves = CounterMetricFamily("dq_breaker_transitions", "Times the topic's circuit breaker "
                                "opened or closed", labels=["topic", "to"])
    for key, b in (await breaker_states(store, topics)).items():
        if b["state"] == "unknown":
            continue  # its home shard did not answer: no value rather than a wrong one
        gauge.add_metric([key], 1 if b["state"] == "open" else 0)
        moves.add_metric([key, "open"], int(b["opens"]))
        moves.add_metric([key, "closed"], int(b["closes"]))
    return [gauge, moves]


async def flow(store: Store, topics: list[Topic]) -> list[Metric]:
    """Per topic with flow control (rate_limit, concurrency or paused): whether it is
    paused, its calls in flight counted against its concurrency, and its jobs held back,
    summed over the shards."""
    paused = GaugeMetricFamily("dq_topic_paused", "1 while the topic is paused (adds are "
                               "kept, nothing is called), else 0", labels=["topic"])
    inflight = GaugeMetricFamily("dq_topic_calls_in_flight", "Callbacks of the topic in "
                                 "flight, as counted against its concurrency", labels=["topic"])
    held = GaugeMetricFamily("dq_topic_held_jobs", "Ready jobs of the topic held back by its "
                             "rate_limit, concurrency or pause", labels=["topic"])
    controlled = [t for t in topics if t.flow_controlled]
    found = await asyncio.gather(*(store.stats.flow_totals(t.topic) for t in controlled))
    for t, totals in zip(controlled, found, strict=True):
        paused.add_metric([t.topic], 1 if t.paused else 0)
        if totals is not None:
            inflight.add_metric([t.topic], totals["inflight"])
            held.add_metric([t.topic], totals["held"])
    return [paused, inflight, held]


def _shard_label(shard: Shard) -> str:
    """The shard's name as dq_shard_up shows it (config shards are named by their URL)."""
    return mask_url(shard.name) if "://" in shard.name else shard.name


async def _used_memory(shard: Shard) -> int | None:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            info = await shard.call("INFO", "memory")
    except (DqError, RedisError, OSError, TimeoutError):
        return None
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "used_memory" and value.strip().isdigit():
            return int(value)
    return None


async def shard_memory(st: WebState) -> GaugeMetricFamily:
    """Used memory of every shard this console uses (absent when it does not answer); a
    Redis Cluster's is summed over the masters that serve its partitions."""
    shards = st.store.shards.shards
    gauge = GaugeMetricFamily("dq_shard_used_memory_bytes", "Memory the shard's Redis uses",
                              labels=["shard"])
    used = await asyncio.gather(*(_used_memory(sh) for sh in shards))
    per_cluster: dict[str, dict[Any, int]] = {}
    for shard, n in zip(shards, used, strict=True):
        node = getattr(shard.conn, "node_addr", None)
        if n is None:
            continue
        if node is not None:  # a partition of a Redis Cluster: count each master once
            per_cluster.setdefault(mask_url(shard.url), {})[node] = n
        else:
            gauge.add_metric([_shard_label(shard)], n)
    for label, nodes in per_cluster.items():
        gauge.add_metric([label], sum(nodes.values()))
    return gauge


async def delivery_histograms(store: Store, topics: list[Topic]) -> list[Metric]:
    """Per topic: how late callbacks were made (due time -> call) and how long they took,
    over every callback attempt, summed over the shards."""
    late = HistogramMetricFamily("dq_delivery_lateness_seconds", "Time from a job's due time "
                                 "to its callback, per attempt", labels=["topic"])
    took = HistogramMetricFamily("dq_callback_duration_seconds", "Duration of callback "
                                 "requests, per attempt", labels=["topic"])
    found = await asyncio.gather(*(store.stats.histograms(t.topic) for t in topics))
    for topic, hists in zip(topics, found, strict=True):
        for family, name in ((late, "late"), (took, "cb")):
            h = hists[name]
            family.add_metric([topic.topic], buckets=h.buckets, sum_value=h.sum)
    return [late, took]
