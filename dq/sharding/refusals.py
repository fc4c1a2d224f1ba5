"""What a shard says when it will not take a write: a refusal in the shard's own words
(out of memory, a read-only replica, a failed disk save), or a write too few replicas
confirmed (replica_acks). Both are err "unavailable" for the client, neither is a shard
failure. Used by the RESP connection (dq/sharding/resp.py) and the storage layer."""

from __future__ import annotations

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.shardurl import mask

# With replica_acks, how long (ms) a batch of writes waits for its replicas (Redis WAIT)
# before it fails as ReplicasBehind: well under add_timeout, so that an add is answered
# in time and its shard is not taken for a silent one.
WAIT_MS = 150
REFUSAL_LOG_EVERY = 10.0  # seconds between a connection's log lines about refused writes

# (text in the Redis error, what it means, what the operator does). In a Lua script the
# error comes wrapped ("ERR Error running script ...: -OOM command not allowed ...").
REFUSALS: tuple[tuple[str, str, str], ...] = (
    ("OOM command not allowed", "is out of memory (maxmemory)",
     "its operator must free memory or raise maxmemory"),
    ("READONLY You can't write", "is a read-only replica",
     "point dq at its master, or at Sentinel with redis+sentinel://"),
    ("MISCONF ", "cannot save to disk (MISCONF) and refuses writes",
     "its operator must fix its disk or save settings"),
)


def safe_name(text: str) -> str:
    """A shard name or URL with any password masked, fit for a log line, an error or the
    health record (a shard from the settings is named by its URL)."""
    return mask(text)


class ShardRefused(DqError):
    """A shard that is up but refuses writes (out of memory, a read-only replica, a failed
    disk save): err "unavailable", with what is wrong in the shard's words. Not a shard
    failure: reads still work there, so its breaker stays closed and an add is not moved
    to another shard (nothing would move it home while the shard refuses writes)."""

    def __init__(self, label: str, what: str, fix: str) -> None:
        self.label, self.what, self.fix = label, what, fix
        super().__init__(UNAVAILABLE, f"redis shard {label} {what}: nothing was written; {fix}")

    def for_add(self) -> DqError:
        """The same refusal, worded for the client whose add it refused."""
        return DqError(UNAVAILABLE, f"redis shard {self.label} {self.what}: job not stored; "
                       f"retry later ({self.fix})")


class ReplicasBehind(ShardRefused):
    """A write the master made but fewer than `replica_acks` replicas confirmed within
    WAIT_MS (Redis WAIT): err "unavailable". Like a refusal it neither opens the shard's
    breaker nor moves an add to another shard: the job is on this shard's master (it may
    still be delivered), and the client's retry of the same id replaces it there."""

    def __init__(self, label: str, wanted: int, got: int | None, why: str = "") -> None:
        self.label, self.wanted, self.got = label, wanted, got
        self.what = (f"stored it on the master but not yet on {wanted} replica(s) within "
                     f"{WAIT_MS} ms ({why or f'{got} confirmed'})")
        self.fix = ("retry: the same id replaces the job, so it is not delivered twice; if "
                    "this goes on, check the replicas (INFO replication) or lower "
                    "replica_acks")
        DqError.__init__(self, UNAVAILABLE, f"redis shard {label} {self.what}; {self.fix}")

    def for_add(self) -> DqError:
        return DqError(UNAVAILABLE, f"redis shard {self.label} {self.what}: the add is not "
                       f"acknowledged; {self.fix}")
