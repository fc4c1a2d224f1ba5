"""What the store hands out about jobs: tids, states, leased jobs and console views."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dq.sharding.shards import Shard


def make_tid(topic: str, job_id: str) -> str:
    return f"{topic}:{job_id}"


def split_tid(tid: str) -> tuple[str, str]:
    topic, _, job_id = tid.partition(":")
    return topic, job_id


class JobState(StrEnum):
    """Where a stored job is; the values are what the console and its API show."""

    DELAYED = "delayed"  # in its delay bucket, due later
    READY = "ready"  # due: in a ready list (or a flow-controlled topic's held list)
    INFLIGHT = "inflight"  # leased to a consumer, being delivered
    DEAD = "dead"  # used up its attempts: a dead letter


@dataclass(frozen=True, slots=True)
class FlowLimit:
    """A topic's flow control on one shard, as the claim script takes it: its share of the
    topic's rate (calls per second, 0 = none), burst and concurrency (0 = none)."""

    topic: str
    rate: float = 0.0
    burst: float = 1.0
    concurrency: int = 0
    paused: bool = False


@dataclass(frozen=True)
class Claimed:
    """A job leased to a consumer: deliver it, then ack, retry or bury it."""

    shard: Shard
    tid: str
    topic: str
    id: str
    version: str
    priority: int
    attempt: int  # deliveries before this one: failed, or cut off by an expired lease
    due_ms: int
    set_ms: int
    body: dict[str, Any]
    claimed_ms: int  # shard clock at claim
    unreadable: str = ""  # why the stored job cannot be read: not called, kept as dead
    flow_lease: int = 0  # its lease deadline when it took a topic concurrency slot, else 0


@dataclass(frozen=True)
class JobInfo:
    """What the console shows of one job."""

    shard: str
    topic: str
    id: str
    state: JobState
    due_ms: int
    attempt: int
    priority: int
    body: dict[str, Any]
    error: dict[str, Any] | None = None
    unreadable: str = ""  # why the stored job cannot be read (its body is then {})

    @property
    def retrying(self) -> bool:
        """Whether the job waits for another attempt after failed ones (its `due_ms` is
        when that attempt is due, `error` the last one's error)."""
        return self.state in (JobState.DELAYED, JobState.READY) and self.attempt > 0


@dataclass(frozen=True)
class AddResult:
    replaced: bool
    due_ms: int
    shard: str
