"""What the health tests share with the cluster tests: their settings, Prometheus samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dq.config import Settings


def make_settings(tmp: Path, urls: list[str], **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        redis=tuple(urls), db=f"sqlite:///{tmp / 'dq.sqlite3'}", data_dir=str(tmp / "var"),
        host="127.0.0.1", port=0, buckets=4, timers=1, concurrency=32, retry_unit=0.5,
        lease=3.0, timer_tick=0.2, grace=5.0, registry_refresh=0.2, checker_interval=0.2,
        shard_down_after=2.0, max_attempts=20, web_password="pw")
    base.update(kw)
    return Settings(**base)


def prom_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out
