"""replica_acks on one RESP connection: the replies of the writes (scripts) of each flush
are held until the one Redis WAIT sent after them answers (group commit), then told their
own results, or ReplicasBehind when too few replicas confirmed them."""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, TypeAlias

from dq.sharding.refusals import REFUSAL_LOG_EVERY, WAIT_MS, ReplicasBehind
from dq.sharding.respproto import PING, ReplyCallback, Waiter, pack, settle

if TYPE_CHECKING:
    from dq.sharding.resp import RespConnection

log = logging.getLogger("dq.resp")

# Writes whose replies wait for a WAIT: (waiter, strict, reply, error), filled in as each
# reply is read; a strict one fails when the WAIT falls short.
Held: TypeAlias = "list[tuple[Waiter, bool, Any, BaseException | None]]"
# The commands that change jobs (every state change is a script): with replica_acks, each
# flush of the connection that carries one is followed by one WAIT.
DURABLE = frozenset((b"EVALSHA", "EVALSHA", b"EVAL", "EVAL"))
# After a WAIT fell short, the writes of the next SHORT_FOR seconds are not waited for
# (a PING marks where their replies end) and fail as ReplicasBehind at once; then one WAIT
# tries again. WAIT holds the connection (and Redis times it out only on its 100 ms
# cron), so waiting for each batch while a replica is gone would leave every other
# command queued behind the refused adds.
SHORT_FOR = 1.0


def _held(held: Held, waiter: Waiter, strict: bool, reply: Any,
          error: BaseException | None) -> None:
    held.append((waiter, strict, reply, error))


class ReplicaWaits:
    """The WAITs of one connection that waits for `conn.replica_acks` replicas."""

    def __init__(self, conn: RespConnection) -> None:
        self.conn = conn
        self.held: Held | None = None  # the writes of the flush being gathered
        self.short_until = 0.0  # monotonic: writes are not waited for until then
        # One WAIT (or PING) in flight at a time; the writes flushed meanwhile wait for the
        # next, sent when it answers (group commit: they arrive at Redis behind it anyway).
        self.wait_out = False
        self.pending: list[Held] = []
        self.behind = 0  # writes not confirmed by enough replicas since the last log line
        self.behind_logged = -REFUSAL_LOG_EVERY  # monotonic

    def hold(self, waiter: Waiter, args: tuple[Any, ...]) -> ReplyCallback:
        """A write's waiter, held until the WAIT that follows it in this flush answers.
        It fails when the WAIT falls short unless its script is one of `conn.lenient`."""
        if self.held is None:
            self.held = []
        strict = len(args) < 2 or args[1] not in self.conn.lenient
        return functools.partial(_held, self.held, waiter, strict)

    def flushing(self) -> None:
        """The connection is about to write: the writes of this flush, then one WAIT whose
        answer releases their replies."""
        if self.held is not None and self.conn.connected:
            if self.wait_out:
                self.pending.append(self.held)
            else:
                self.send_wait([self.held])
            self.held = None

    def send_wait(self, groups: list[Held]) -> None:
        """Queue the WAIT (or, while replicas are known missing, a PING) whose answer
        releases these writes' replies; written with the next flush."""
        self.wait_out = True
        conn = self.conn
        if self.short_until > time.monotonic():
            conn.out.append(PING)
            conn.waiting.append(functools.partial(self.release, groups, waited=False))
        else:
            conn.out.append(pack(("WAIT", conn.replica_acks, WAIT_MS)))
            conn.waiting.append(functools.partial(self.release, groups))

    def release(self, groups: list[Held], reply: Any, error: BaseException | None, *,
                waited: bool = True) -> None:
        """The WAIT after a flush's writes answered: they are told their own results when
        enough replicas confirmed them, else ReplicasBehind (a write that failed on its
        own is told its own error). Not `waited`: the PING sent instead of a WAIT while
        replicas are known to be missing answered."""
        acks, label = self.conn.replica_acks, self.conn.label
        short: BaseException | None = None
        if error is not None:
            short = ReplicasBehind(label, acks, None, f"no answer: {error}")
        elif not waited:
            short = ReplicasBehind(label, acks, None, "the last wait fell short; waiting "
                                   "again within a second")
        elif not isinstance(reply, int) or reply < acks:
            short = ReplicasBehind(label, acks, reply)
            self.short_until = time.monotonic() + SHORT_FOR
        else:
            self.short_until = 0.0
        self.wait_out = False
        held = [item for group in groups for item in group]
        if short is not None and held:
            self._log_behind(len(held), error or f"WAIT said {reply}")
        for waiter, strict, res, exc in held:
            if exc is None and short is not None and strict:
                res, exc = None, short
            settle(waiter, res, exc)
        if self.pending and self.conn.connected:
            pending, self.pending = self.pending, []
            self.send_wait(pending)
            self.conn.flush()

    def _log_behind(self, n: int, why: object) -> None:
        self.behind += n
        now = time.monotonic()
        if now >= self.behind_logged + REFUSAL_LOG_EVERY:
            log.warning("redis shard %s: %d write(s) not confirmed by %d replica(s) "
                        "within %d ms since the last report (%s); they are answered "
                        "unavailable", self.conn.label, self.behind, self.conn.replica_acks,
                        WAIT_MS, why)
            self.behind_logged, self.behind = now, 0

    def lost(self, err: BaseException) -> None:
        """The connection is gone: writes flushed with no WAIT yet, or never flushed, each
        get `err`."""
        groups = self.pending + ([self.held] if self.held is not None else [])
        self.pending, self.held, self.wait_out = [], None, False
        if groups:
            self.release(groups, None, err)
