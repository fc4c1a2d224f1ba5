"""Replies: worked out out of order, written in request order, a write per batch.

A request is answered by bytes at once (a ping, a bad frame) or by a `Pending` the
handler sets later: when the shard answers the batch of adds it joined, or when the
coroutine of a get, a del or a retried add ends. An add_many frame's jobs are gathered by
a `_Many`, whose `reply` is set once the last of them is known.

Each connection keeps its replies in a `ReplyQueue`, in the order its requests came in.
A reply set at the head of the queue is not written at once: the connection is marked
ready with the server's `Coalescer`, which writes every ready connection's replies (one
write each) right after the store has handed out the batch's Redis reply, or at the end
of the loop turn when no batch is being handed out. So many replies made ready by one
Redis round trip leave in one write per connection, not one per reply.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.refusals import ReplicasBehind
from dq.sharding.shards import Shard
from dq.storage.store import AddJob, Store
from dq.wire.frames import error_reply, many_reply
from dq.wire.requests import AddRequest

if TYPE_CHECKING:
    from dq.roles.server.handler import Handler

log = logging.getLogger("dq.server")


class Pending:
    """A reply still being worked out, holding its place in the connection's reply queue.

    Cheaper than a Future on the hot path: setting it tells the connection directly, and
    the connections with replies ready write once per batch (`Coalescer.flush_ready`,
    right after the batch's Redis reply is handed out), not once per reply through a loop
    callback each."""

    __slots__ = ("data", "on_set")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.on_set: Callable[[], None] | None = None

    def set(self, data: bytes) -> None:
        if self.data is None:
            self.data = data
            if self.on_set is not None:
                self.on_set()

    @classmethod
    def of(cls, coro: Coroutine[Any, Any, bytes]) -> Pending:
        """The reply a request handled by a coroutine (the slow path) will give."""
        pending = cls()

        def done(task: asyncio.Task[bytes]) -> None:
            if task.cancelled():  # only when the loop shuts down
                pending.set(error_reply((UNAVAILABLE, "the server is stopping; "
                                                  "retry on another dq server")))
            else:
                pending.set(task.result())

        asyncio.ensure_future(coro).add_done_callback(done)
        return pending


class _Many:
    """An add_many frame's jobs on their way: their results in order, and the frame's reply
    once the last one is known."""

    __slots__ = ("handler", "left", "reply", "results", "sent", "t0")

    def __init__(self, handler: Handler, n: int, t0: float) -> None:
        self.handler, self.t0 = handler, t0
        self.results: list[DqError | None] = [None] * n
        # per job: what was queued for the batch, until it is retried alone
        self.sent: list[tuple[AddRequest, Shard, AddJob] | None] = [None] * n
        self.left = n
        self.reply = Pending()

    def stored(self, i: int, res: Any, exc: BaseException | None) -> None:
        """The batch's answer for job i (the store's callback)."""
        if isinstance(exc, ReplicasBehind):  # on the master: not to be stored elsewhere
            sent, self.sent[i] = self.sent[i], None
            assert sent is not None
            self.set(i, self.handler._behind(sent[0], sent[1], self.t0, exc))
        elif exc is not None:
            self.handler._many_slow(self, i, exc)
        else:
            self.set(i, None)

    def set(self, i: int, error: DqError | None) -> None:
        self.results[i] = error
        self.left -= 1
        if not self.left:
            self.handler._many_stored(self)
            self.reply.set(many_reply(self.results))


class Coalescer:
    """The connections of one server with replies ready, written together: right after
    the store's batcher has handed out a batch's Redis reply (while `hooked` to it as an
    `on_batch_settled` observer), else at the end of the loop turn."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.batch = store.batch  # its `settling` is set while it hands a reply out
        self.loop = loop
        self.ready: set[ReplyQueue] = set()  # with replies ready to be written
        self.flush_scheduled = False  # flush_ready is to run at the end of the loop turn
        self.hooked = False  # the store calls flush_ready after each batch's reply

    def hook(self) -> None:
        self.batch.on_batch_settled.append(self.flush_ready)
        self.hooked = True

    def unhook(self) -> None:
        """The store no longer calls flush_ready (a reply made ready later is written at
        the end of its loop turn)."""
        if self.hooked:
            self.hooked = False
            self.batch.on_batch_settled.remove(self.flush_ready)

    def flush_ready(self) -> None:
        self.flush_scheduled = False
        if self.ready:
            ready, self.ready = self.ready, set()
            for conn in ready:
                try:
                    conn._flush()
                except Exception:  # a bug must cost that connection, not the others
                    log.exception("writing the replies of a connection failed")
                    if conn.transport is not None:
                        conn.transport.abort()


class ReplyQueue:
    """A connection's replies in request order, each with the number of requests it
    answers (an add_many frame's adds, else one); the part of a connection that writes.

    The connection (dq/roles/server/connection.py) is told through `_written` after each
    write, and decides there whether to close, start more requests or read again."""

    transport: asyncio.Transport | None

    def __init__(self, coalescer: Coalescer) -> None:
        self.coalescer = coalescer
        self.replies: collections.deque[tuple[Pending | bytes, int]] = collections.deque()
        self.in_progress = 0  # requests answered by the queued replies: their sum

    def _queue(self, reply: Pending | bytes, count: int = 1) -> None:
        """Queue the reply to `count` requests (an add_many frame's adds, else one)."""
        if isinstance(reply, bytes) and not self.replies:
            assert self.transport is not None
            self.transport.write(reply)
            return
        self.replies.append((reply, count))
        self.in_progress += count
        if isinstance(reply, Pending) and reply.data is None:
            reply.on_set = self._reply_ready
        else:
            self._flush()

    def _reply_ready(self) -> None:
        """A queued reply is ready: write it (with any others ready by then) once the
        current batch of Redis replies has been handed out (the store calls flush_ready
        then), in one write per connection; ready otherwise, at the end of the loop turn."""
        coalescer = self.coalescer
        coalescer.ready.add(self)
        if not coalescer.flush_scheduled and not (coalescer.hooked
                                                  and coalescer.batch.settling):
            coalescer.flush_scheduled = True
            coalescer.loop.call_soon(coalescer.flush_ready)

    def _flush(self) -> None:
        """Write the replies ready at the head of the queue, in one write."""
        if self.transport is None or self.transport.is_closing():
            return
        out = []
        replies = self.replies
        while replies:
            head, count = replies[0]
            if isinstance(head, Pending):
                if head.data is None:
                    break
                out.append(head.data)
            else:
                out.append(head)
            replies.popleft()
            self.in_progress -= count
        if out:
            self.transport.write(b"".join(out))
        self._written()

    def _written(self) -> None:
        """After a flush: what the connection does next (close, start more, read)."""
        raise NotImplementedError

    def _drop_replies(self) -> None:
        """The connection is gone: its pending replies tell nobody."""
        for item, _ in self.replies:
            if isinstance(item, Pending):
                item.on_set = None
        self.replies.clear()
        self.in_progress = 0
