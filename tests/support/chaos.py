"""What the chaos, cluster and Sentinel tests share: a registry file with a topic, a flaky
callback receiver, adds that count only what dq acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dq.client import AsyncDqClient
from dq.errors import UNAVAILABLE, DqError
from dq.registry.core import Registry, Topic
from tests.support.receiver import Receiver, Reply, Request


def register(db_path: Path, topic: str, callback: str, **kw: Any) -> str:
    """A topic in a SQLite registry; returns the registry's URL for --db."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{db_path}"
    reg = Registry(url)
    fields: dict[str, Any] = dict(topic=topic, name=topic, delay=0, callback=callback,
                                  method="POST", timeout_ms=3000, creator="chaos")
    fields.update(kw)
    reg.save_topic(Topic(**fields))
    reg.close()
    return url


@dataclass
class Flaky:
    """Answers each callback after 0..max_ms, with 500 (and a body that *looks* like success)
    for `fail` of them; records when each request that got a 2xx arrived (the answer goes
    out later: after the random wait, and on a loaded machine later still)."""

    fail: float = 0.2
    max_ms: float = 50.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    calls: Counter[str] = field(default_factory=Counter)
    ok_at: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failed: Counter[str] = field(default_factory=Counter)
    attempts_after_500: int = 0

    async def __call__(self, req: Request) -> Reply:
        arrived = time.time()
        await asyncio.sleep(self.rng.uniform(0, self.max_ms / 1000))
        jid = req.job_id
        self.calls[jid] += 1
        if self.failed[jid]:
            self.attempts_after_500 += 1
        if self.rng.random() < self.fail:
            self.failed[jid] += 1
            return 500, b'{"code":0,"msg":"succ"}'
        self.ok_at[jid].append(arrived)
        return 200, b'{"code":0}'

    def delivered(self) -> set[str]:
        return {j for j, times in self.ok_at.items() if times}

    def duplicates(self) -> dict[str, list[float]]:
        return {j: t for j, t in self.ok_at.items() if len(t) > 1}


@contextlib.asynccontextmanager
async def receiving(handler: Flaky) -> AsyncIterator[Receiver]:
    async with Receiver(handler) as rcv:
        yield rcv


async def add_acked(client: AsyncDqClient, jobs: list[dict[str, Any]],
                    retried: set[str], deadline: float) -> int:
    """Pipelined adds; an add answered `unavailable` (or a connection lost with its server)
    is sent again until acknowledged. Any other refusal fails the test. Returns how often
    the client had to open a new connection (it resends a batch whose server went away)."""
    pending = jobs
    reconnects = 0
    conn = getattr(client, "_conn", None)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} adds never acknowledged"
        try:
            res = await client.add_many(pending, chunk=200)
        except DqError as exc:
            assert exc.err == UNAVAILABLE, exc
            retried.update(j["id"] for j in pending)
            await asyncio.sleep(0.05)
            continue
        again = []
        for job, err in zip(pending, res, strict=True):
            if err is not None:
                assert err.err == UNAVAILABLE, (job, err)
                again.append(job)
        retried.update(j["id"] for j in again)
        pending = again
        if pending:
            await asyncio.sleep(0.05)
    if getattr(client, "_conn", None) is not conn:
        reconnects += 1
    return reconnects
