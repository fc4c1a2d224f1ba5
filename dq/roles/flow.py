"""Per-topic flow control, the consumer's side: each topic's limits as every shard's share.

The claim script (dq/storage/lua/claim.lua) enforces a topic's `rate_limit`, `concurrency` and
`paused` with state kept on each shard, so a limit holds across every consumer and dq
instance working that shard. A script runs on one shard only, so a topic's limit is
divided among the shards: each gets rate/S calls per second (and a burst of a tenth of
a second's worth, at least one call), and the concurrency is split into whole slots, the
remainder going to shards chosen by the topic's name so that topics spread over them.
Together the shards never allow more than the limit, except that every shard keeps at
least one concurrency slot (a shard with none could never call the topic's jobs there):
a concurrency below the number of shards allows up to one call per shard.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence

from dq.registry.core import Topic
from dq.storage.store import FlowLimit

BURST_SECONDS = 0.1  # the burst a rate limit allows, in seconds of its rate


def burst(rate: int) -> int:
    """The calls a topic limited to `rate` per second may make at once after a quiet spell."""
    return max(1, math.ceil(rate * BURST_SECONDS))


def shard_share(topic: Topic, index: int, shards: int) -> FlowLimit:
    """Topic's limits as the shard at `index` (of `shards`, in name order) enforces them."""
    rate = topic.rate_limit / shards if topic.rate_limit else 0.0
    cap = 0
    if topic.concurrency:
        base, extra = divmod(topic.concurrency, shards)
        first = zlib.crc32(topic.topic.encode()) % shards  # where the remainder starts
        cap = max(1, base + (1 if (index - first) % shards < extra else 0))
    return FlowLimit(topic=topic.topic, rate=rate,
                     burst=max(1.0, burst(topic.rate_limit) / shards) if rate else 1.0,
                     concurrency=cap, paused=topic.paused)


def shard_limits(topics: Iterable[Topic], held: Iterable[str], name: str,
                 names: Sequence[str]) -> list[FlowLimit]:
    """What the claim script on shard `name` (one of `names`) takes: the flow-controlled
    topics' shares, and the topics with held jobs there whose control was lifted (or that
    are gone), with no limit, so their held jobs are called (or parked as unknown)."""
    order = sorted(names)
    index, n = order.index(name), len(order)
    out = {t.topic: shard_share(t, index, n) for t in topics if t.flow_controlled}
    for key in held:
        if key not in out:
            out[key] = FlowLimit(topic=key)
    return sorted(out.values(), key=lambda f: f.topic)
