"""/healthz (always open) and /metrics in Prometheus text format (open when
settings.metrics_public, else behind the API password)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from web import schemas as s
from web.auth import require_api
from web.ops import shard_views, topic_counters
from web.state import db, state

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
    """Per-topic event counters and per-shard job counts, for Prometheus."""
    st = state(request)
    if not st.settings.metrics_public:
        require_api(request)
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
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot([events, up, jobs]))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
