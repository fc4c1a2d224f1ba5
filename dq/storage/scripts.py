"""The Lua scripts (dq/storage/lua/*.lua): read here, and handed to the shard layer, which
loads and calls them by name without knowing what they do (dq/sharding/shards.py)."""

from __future__ import annotations

import hashlib
from importlib import resources

from dq.sharding.shards import register_scripts

SCRIPT_NAMES = (
    "add", "delete", "move_due", "claim", "ack", "retry", "bury", "requeue_expired", "redrive",
    "guest_take", "guest_land", "guest_drop", "evict", "rebucket", "alert_claim", "park",
    "adopt", "release", "breaker", "retire",
)
# With replica_acks, the scripts whose result is used even when too few replicas have it
# yet: the timers' and consumers' steps. Lost with their master, they are only done again
# (a job moved, claimed or acked again: called again at worst, as at-least-once allows),
# and failing them would stop deliveries while a replica is away. The client's own
# changes (add, delete, redrive, adopt) fail instead: their answer promises N replicas.
STRICT = ("add", "delete", "redrive", "adopt")


def _load_scripts() -> dict[str, tuple[str, str]]:
    """name -> (sha1, source) for every dq/storage/lua/*.lua script, each after
    dq/storage/lua/_job.lua (the helpers that read a job's payload)."""
    lua = resources.files("dq.storage").joinpath("lua")
    prelude = lua.joinpath("_job.lua").read_text(encoding="utf-8")
    out = {}
    for name in SCRIPT_NAMES:
        src = prelude + lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        out[name] = (hashlib.sha1(src.encode()).hexdigest(), src)
    return out


SCRIPTS = _load_scripts()
register_scripts(SCRIPTS, lenient=[name for name in SCRIPTS if name not in STRICT])
