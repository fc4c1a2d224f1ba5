"""The TCP server: the original's framing, add / get / del / ping, many clients at once.

Each connection is an asyncio Protocol. Requests on one connection are handled
concurrently and answered in order (clients may pipeline); every Redis call goes through
the shard's batching queue, so requests from many connections share round trips. A
connection that sends garbage, stalls inside a frame or never reads its replies (or, with
`idle_timeout` set, idles too long) is answered or closed on its own; it never holds up the
others. A client that half-closes is answered in full, then closed. A reload hands every
connection, once what it sent is answered, to a server of the new generation
(dq/runtime/handover.py), so a client that never reconnects keeps its connection.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from dq.errors import (
    BAD_REQUEST,
    NOT_FOUND,
    TOO_MANY_CONNECTIONS,
    TOPIC_OFFLINE,
    UNAVAILABLE,
    UNKNOWN_TOPIC,
    DqError,
)
from dq.registry.core import Registry, Topic
from dq.registry.topics import TopicCache
from dq.runtime.context import Context, open_store, role_plan
from dq.runtime.handover import HandoverReceiver, hand
from dq.runtime.shared import LoadBoard, bind_listener
from dq.sharding.resp import ReplicasBehind, ShardRefused
from dq.sharding.shards import Shard
from dq.storage.store import AddJob, Store
from dq.wire import protocol
from dq.wire.protocol import (
    AddRequest,
    DelRequest,
    FrameDecoder,
    FrameError,
    GetRequest,
    decode_payload,
)

log = logging.getLogger("dq.server")
request_log = logging.getLogger("dq.request")

MAX_OUTSTANDING = 4096  # requests in progress per connection before reading pauses (an
#                        add_many frame counts as the adds it carries, a get or del as
#                        SLOW_WEIGHT) ...
MAX_FRAMES_OUT = 1024  # ... or frames (at most 9,999 bytes each: 10 MB)
# Gets and dels (and other requests answered by a coroutine) in progress per connection:
# a coroutine each, and a get's reply is up to 10 KB where an add's is 33 bytes. Five
# clients that pipeline gets and never read then put ~MAX_SLOW * 5 requests ahead of
# everyone else's, not ~5,000 (a canary waited 224-723 ms behind them; bench/stall.py).
MAX_SLOW = 16
SLOW_WEIGHT = MAX_OUTSTANDING // MAX_SLOW  # what one counts for in in_progress
TURN_SLICE = 128  # requests of one connection started per loop turn (one frame more at most)
WRITE_HIGH = 64 * 1024  # unsent reply bytes of a connection before it starts no more requests
FRAME_TIMEOUT = 10.0  # seconds a started frame may take to arrive in full
DEFER = 0.002  # seconds a busier server leaves a new connection to the others
ACCEPT_BURST = 16  # connections accepted a loop turn at most
ACCEPT_RETRY = 1.0  # seconds without accepting after running out of file descriptors


class Pending:
    """A reply still being worked out, holding its place in the connection's reply queue.

    Cheaper than a Future on the hot path: setting it tells the connection directly, and
    the connections with replies ready write once per batch (`Server.flush_ready`, right
    after the batch's Redis reply is handed out), not once per reply through a loop
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
                pending.set(protocol.error_reply((UNAVAILABLE, "the server is stopping; "
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
            self.handler._many_slow(self, i)
        else:
            self.set(i, None)

    def set(self, i: int, error: DqError | None) -> None:
        self.results[i] = error
        self.left -= 1
        if not self.left:
            self.handler._many_stored(self)
            self.reply.set(protocol.many_reply(self.results))


def log_request(cmd: str, topic: object, job_id: object, status: str, t0: float,
                shard: str = "", error: str = "") -> None:
    """One "dq.request" line per request: the fields in the text and, for --log-format
    json, as record attributes too. Failures a client cannot fix are warnings."""
    level = logging.WARNING if status == UNAVAILABLE else logging.INFO
    if not request_log.isEnabledFor(level):
        return
    ms = round((time.monotonic() - t0) * 1000, 2)
    request_log.log(level, "%s topic=%s id=%s status=%s ms=%.2f%s%s", cmd, topic, job_id,
                    status, ms, f" shard={shard}" if shard else "",
                    f" error={error}" if error else "",
                    extra={"cmd": cmd, "topic": topic, "id": job_id, "status": status,
                           "ms": ms, "shard": shard, "error": error})


class Handler:
    """What a request does, shared by every connection of one server process."""

    def __init__(self, store: Store, topics: TopicCache, ctx: Context) -> None:
        self.store = store
        self.topics = topics
        self.settings = ctx.settings
        self.stats = collections.Counter[str]()
        self.loop = asyncio.get_running_loop()  # made in the loop it serves

    def topic(self, key: str) -> Topic:
        topic = self.topics.get_nowait(key)
        if topic is None:
            raise DqError(UNKNOWN_TOPIC, f"topic {key!r} is not registered; register it in the "
                          "console (or the dq_topic table) before adding jobs to it")
        if not topic.online:
            raise DqError(TOPIC_OFFLINE, f"topic {key!r} is offline; set it online in the "
                          "console to accept jobs again")
        return topic

    def fast(self, obj: protocol.Frame) -> bytes | Pending:
        """Answer a request, without a coroutine when it is an add on an open connection
        (the hot path): the reply is set when the shard answers the batch of adds this loop
        turn queued for it."""
        cmd = obj.get("cmd")
        if cmd != "add":
            return self.add_many(obj) if cmd == "add_many" else Pending.of(self.handle(obj))
        t0 = time.monotonic()
        try:
            req = protocol.parse_request(obj, tz=self.settings.zone)
            assert isinstance(req, AddRequest)
            shard, job = self._add_job(req)
        except DqError as exc:
            self.stats["fail"] += 1
            log_request("add", obj.get("topic"), obj.get("id"), exc.err, t0)
            return protocol.error_reply(exc)
        except Exception as exc:  # a bug must cost one reply, not the connection
            return self._unexpected(obj, exc)
        if not shard.conn.connected:
            return Pending.of(self.handle(obj))
        reply = Pending()

        def done(res: Any, exc: BaseException | None) -> None:
            if exc is None:
                self.stats["add"] += 1
                log_request("add", req.topic, req.id, "ok", t0, shard.label)
                reply.set(protocol.OK_EMPTY)
                return
            if isinstance(exc, ReplicasBehind):  # on the master: not to be stored elsewhere
                reply.set(protocol.error_reply(self._behind(req, shard, t0, exc)))
                return
            # scripts not loaded yet, or an error: the ordinary path retries or explains
            slow = Pending.of(self._add_slow(shard, job, req, t0))
            slow.on_set = lambda: reply.set(slow.data or b"")

        self.store.add_nowait(shard, job, done)
        return reply

    def add_many(self, obj: protocol.Frame) -> bytes | Pending:
        """An add_many frame: each job is an add of its own (validated, routed and batched
        like one), and the one reply lists their results in order."""
        t0 = time.monotonic()
        try:
            items = protocol.parse_many(obj)
        except DqError as exc:
            self.stats["fail"] += 1
            log_request("add_many", None, None, exc.err, t0)
            return protocol.error_reply(exc)
        many = _Many(self, len(items), t0)
        parse, zone, add_job, add_nowait = (protocol.parse_add, self.settings.zone,
                                            self._add_job, self.store.add_nowait)
        for i, item in enumerate(items):
            try:
                req = parse(item, tz=zone)
                shard, job = add_job(req)
            except DqError as exc:
                self.stats["fail"] += 1
                log_request("add", item.get("topic") if isinstance(item, dict) else None,
                            item.get("id") if isinstance(item, dict) else None, exc.err, t0)
                many.set(i, exc)
                continue
            except Exception as exc:  # a bug must cost one job, not the connection
                many.set(i, self._unexpected_error(item, exc))
                continue
            many.sent[i] = (req, shard, job)
            if shard.conn.connected:
                add_nowait(shard, job, functools.partial(many.stored, i))
            else:
                self._many_slow(many, i)
        return many.reply if many.reply.data is None else many.reply.data

    def _behind(self, req: AddRequest, shard: Shard, t0: float,
                exc: ReplicasBehind) -> DqError:
        """An add its batch stored on the master but fewer than replica_acks replicas
        confirmed in time: answered unavailable at once (tried again alone it would wait
        for the replicas once more, one add at a time)."""
        self.stats["fail"] += 1
        error = exc.for_add()
        log_request("add", req.topic, req.id, error.err, t0, shard.label, error.msg)
        return error

    def _many_slow(self, many: _Many, i: int) -> None:
        """A job of an add_many frame the batch could not store, tried once more alone."""
        sent = many.sent[i]
        assert sent is not None
        req, shard, job = sent
        many.sent[i] = None  # it is counted and logged by _add_retry

        def done(task: asyncio.Task[DqError | None]) -> None:
            many.set(i, DqError(UNAVAILABLE, "the server is stopping; retry on another dq "
                                "server") if task.cancelled() else task.result())

        asyncio.ensure_future(self._add_retry(shard, job, req, many.t0)).add_done_callback(done)

    def _many_stored(self, many: _Many) -> None:
        """Count (and log) an add_many frame's jobs its batches stored, once they all have
        their results."""
        added = [sent for sent, res in zip(many.sent, many.results, strict=True)
                 if sent is not None and res is None]
        self.stats["add"] += len(added)
        if request_log.isEnabledFor(logging.INFO):
            for req, shard, _ in added:
                log_request("add", req.topic, req.id, "ok", many.t0, shard.label)

    async def _add_slow(self, shard: Shard, job: AddJob, req: AddRequest, t0: float) -> bytes:
        error = await self._add_retry(shard, job, req, t0)
        return protocol.OK_EMPTY if error is None else protocol.error_reply(error)

    async def _add_retry(self, shard: Shard, job: AddJob, req: AddRequest,
                         t0: float) -> DqError | None:
        """An add the batch could not store (scripts not loaded, an error, a shard down),
        tried once more on its own: None when stored, else the error for its client."""
        try:
            try:
                await self.store.add_once(shard, job)
            except DqError as exc:
                if exc.err != UNAVAILABLE or isinstance(exc, ShardRefused):
                    raise
                # Its shard is down (and maybe not yet known to be): write to the next
                # healthy shard in the tid's order instead, once; get/del look there too.
                failed = shard
                shard, job = self._add_job(req, exclude=(failed.name,))
                if shard is failed:
                    raise
                self.stats["failover"] += 1
                await self.store.add_once(shard, job)
        except DqError as exc:
            if isinstance(exc, ShardRefused):
                exc = exc.for_add()  # logged once per shard every few seconds by dq.sharding.resp
            self.stats["fail"] += 1
            log_request("add", req.topic, req.id, exc.err, t0, shard.label, exc.msg)
            return exc
        except Exception as exc:
            return self._unexpected_error(req, exc)
        self.stats["add"] += 1
        log_request("add", req.topic, req.id, "ok", t0, shard.label)
        return None

    def _add_job(self, req: AddRequest, exclude: tuple[str, ...] = ()) -> tuple[Shard, AddJob]:
        topic = self.topic(req.topic)
        due_ms, delay_ms = req.due_ms, req.delay_ms
        if due_ms is None and delay_ms is None:
            delay_ms = topic.delay * 1000
        return self.store.add_job(req.topic, req.id, req.body, priority=topic.priority,
                                  due_ms=due_ms, delay_ms=delay_ms, exclude=exclude)

    def _unexpected(self, obj: object, exc: Exception) -> bytes:
        return protocol.error_reply(self._unexpected_error(obj, exc))

    def _unexpected_error(self, obj: object, exc: Exception) -> DqError:
        self.stats["fail"] += 1
        # Not the whole request: a job's body is the client's data, and can be long.
        cmd, topic, job_id = ((obj.get("cmd"), obj.get("topic"), obj.get("id"))
                              if isinstance(obj, dict) else
                              (obj.cmd, obj.topic, obj.id) if isinstance(obj, AddRequest)
                              else (None, None, None))
        log.error("request failed: cmd=%.20r topic=%.100r id=%.100r", cmd, topic, job_id,
                  exc_info=exc)
        return DqError(UNAVAILABLE, f"the server could not complete the request "
                       f"({exc.__class__.__name__}); retry shortly")

    async def handle(self, obj: protocol.Frame) -> bytes:
        t0 = time.monotonic()
        try:
            req = protocol.parse_request(obj, tz=self.settings.zone)
            if isinstance(req, AddRequest):
                return await self._add_slow(*self._add_job(req), req, t0)
            if isinstance(req, GetRequest):
                body = await self.store.get(req.topic, req.id)
                self.stats["get"] += 1
                if body is None:
                    raise DqError(NOT_FOUND, f"no job {req.id!r} in topic {req.topic!r}: it was "
                                  "never added, was deleted, or has been delivered")
                log_request("get", req.topic, req.id, "ok", t0)
                return protocol.ok_reply(body)
            if isinstance(req, DelRequest):
                deleted = await self.store.delete(req.topic, req.id)
                self.stats["del"] += 1
                if not deleted:
                    raise DqError(NOT_FOUND, f"no job {req.id!r} in topic {req.topic!r} to "
                                  "delete: it was never added, was deleted, or was delivered")
                log_request("del", req.topic, req.id, "ok", t0)
                return protocol.OK_EMPTY
            return protocol.OK_EMPTY  # ping
        except DqError as exc:
            self.stats["fail"] += 1
            log_request(str(obj.get("cmd")), obj.get("topic"), obj.get("id"), exc.err, t0,
                        error=exc.msg if exc.err == UNAVAILABLE else "")
            return protocol.error_reply(exc)
        except Exception as exc:
            return self._unexpected(obj, exc)


class Connection(asyncio.Protocol):
    """One client: frames in, replies out in request order."""

    def __init__(self, server: Server, pending: bytes = b"", skipping: int = 0, *,
                 adopted: bool = False) -> None:
        self.server = server
        self.decoder = FrameDecoder(server.settings.max_frame)
        self.adopted = adopted  # handed over by a retiring server (a reload)
        self.handing = False  # being handed to the next server: read no more
        self.transport: asyncio.Transport | None = None
        # replies in request order, each with the number of requests it answers
        self.replies: collections.deque[tuple[Pending | bytes, int]] = collections.deque()
        self.in_progress = 0  # requests answered by the queued replies: their sum
        # frames read, not yet started: their JSON text (decoded when started), or an error
        self.backlog: collections.deque[bytes | FrameError] = collections.deque()
        self.paused_writing = False
        self.reading = True
        self.closing = False
        self.eof = False  # the client sent all it will: close once it is answered
        self.last_active = time.monotonic()
        self.frame_started = 0.0
        self.resume_scheduled = False  # a later loop turn goes on with the backlog
        self.starting = False  # _start_backlog is running (a reply it queued may flush)
        if pending or skipping:  # the frame the retiring server had begun
            self.decoder.restore(pending, skipping)
            self.frame_started = self.last_active

    # asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.opening -= 1
        if (len(self.server.connections) >= self.server.settings.max_connections
                and not self.adopted):
            self.transport.write(protocol.error_reply((
                TOO_MANY_CONNECTIONS, f"the server already has {len(self.server.connections)} "
                "connections, its limit; retry later or use another dq server")))
            transport.close()
            self.server.refused += 1
            return
        self.server.connections.add(self)
        self.transport.set_write_buffer_limits(WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server._publish()
        self.closing = True
        for item, _ in self.replies:
            if isinstance(item, Pending):
                item.on_set = None
        self.replies.clear()
        self.in_progress = 0
        self.backlog.clear()

    def eof_received(self) -> bool | None:
        """The client half-closed (as `nc -N` does): answer every request it sent, then
        close, as the original server did. True keeps the transport open to write."""
        self.eof = True
        if not self.busy:
            return None  # nothing owed: asyncio closes it
        return True

    def pause_writing(self) -> None:
        self.paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.backlog and not self.resume_scheduled:
            self._start_backlog()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        items = self.decoder.split(data)
        self.backlog.extend(items)
        self._start_backlog()
        # A frame's clock starts at its first byte and runs until its last: a client that
        # trickles a byte a second must not hold its frame, and its connection, open.
        if not (self.decoder.pending_bytes or self.decoder.skipping):
            self.frame_started = 0.0
        elif items or not self.frame_started:
            self.frame_started = self.last_active  # a frame ended here; the next began here
        self._update_reading()

    def _start_backlog(self) -> None:
        """Start decoded requests while fewer than MAX_OUTSTANDING are in progress (in
        fewer than MAX_FRAMES_OUT frames), TURN_SLICE of them a loop turn: one client's
        burst of pipelined frames is worked off as its replies go out, and each slice's
        adds are in Redis while the next slice is decoded here."""
        self.resume_scheduled = False
        if self.starting:  # called again by a reply this loop queued: it goes on itself
            return
        self.starting = True
        try:
            handler = self.server.handler
            backlog = self.backlog
            started = 0
            while (backlog and self.in_progress < MAX_OUTSTANDING
                   and len(self.replies) < MAX_FRAMES_OUT and not self.closing
                   and not self.paused_writing):
                if started >= TURN_SLICE:
                    self.resume_scheduled = True
                    handler.loop.call_soon(self._resume)
                    return
                raw = backlog.popleft()
                item = decode_payload(raw) if isinstance(raw, bytes) else raw
                count = 1
                if isinstance(item, FrameError):
                    self._queue(protocol.error_reply(item))
                    if item.fatal:
                        backlog.clear()
                        self._close_after_replies()
                        return
                else:
                    cmd = item.get("cmd")
                    if cmd == "ping":
                        self._queue(protocol.OK_EMPTY)
                    elif cmd == "add":
                        self._queue(handler.fast(item))
                    elif cmd == "add_many":
                        jobs = item.get("jobs")  # as many as its adds
                        if type(jobs) is list and jobs:
                            count = len(jobs)
                        self._queue(handler.fast(item), count)
                    else:
                        self._queue(handler.fast(item), SLOW_WEIGHT)
                started += count
            if self.eof and not self.busy and self.transport is not None:
                self.transport.close()  # half-closed, and all answered (without a flush)
        finally:
            self.starting = False

    def _resume(self) -> None:
        """The next slice of the backlog, a loop turn later."""
        if self.transport is None or self.transport.is_closing():
            self.resume_scheduled = False
            return
        self._start_backlog()
        self._update_reading()

    # replies ---------------------------------------------------------------------------
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
        server = self.server
        server.ready.add(self)
        if not server.flush_scheduled and not (server.hooked
                                               and server.handler.store.batch.settling):
            server.flush_scheduled = True
            server.handler.loop.call_soon(server.flush_ready)

    def _flush(self) -> None:
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
        if not replies and (self.closing or (self.eof and not self.backlog)):
            self.transport.close()
            return
        if (self.backlog and self.in_progress < MAX_OUTSTANDING // 2
                and len(replies) < MAX_FRAMES_OUT // 2
                and not self.resume_scheduled):
            self._start_backlog()
        self._update_reading()

    def _close_after_replies(self) -> None:
        self.closing = True
        self._flush()

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        want = (not self.paused_writing and not self.backlog and not self.handing
                and self.in_progress < MAX_OUTSTANDING and len(self.replies) < MAX_FRAMES_OUT)
        if want != self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
                if self.frame_started:  # its clock stood still while we did not read
                    self.frame_started = time.monotonic()
            else:
                self.transport.pause_reading()

    @property
    def busy(self) -> bool:
        return bool(self.replies or self.backlog)

    # hand-over (a reload) --------------------------------------------------------------
    def stop_reading(self) -> None:
        """Read no more: what the client sends from now on waits in the socket for the
        server this connection is handed to."""
        if not self.handing:
            self.handing = True
            self._update_reading()

    @property
    def handable(self) -> bool:
        """Every request read is answered and its reply is with the kernel: the socket,
        with the frame begun, can go to another server."""
        t = self.transport
        return (self.handing and t is not None and not t.is_closing() and not self.busy
                and not self.eof and not self.closing and not self.decoder.closed
                and t.get_write_buffer_size() == 0)

    @property
    def finishing(self) -> bool:
        """Closes by itself once answered (half-closed, or its frames were garbage)."""
        t = self.transport
        return t is None or t.is_closing() or self.eof or self.closing or self.decoder.closed

    def handed_over(self) -> None:
        """Another server has the socket now: close this process's copy, and only it (no
        shutdown, so the connection stays up)."""
        assert self.transport is not None
        self.transport.abort()


class Server:
    """A server role: accept on the master's socket (or its own), serve until stopping."""

    def __init__(self, ctx: Context, store: Store, topics: TopicCache) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.handler = Handler(store, topics, ctx)
        self.connections: set[Connection] = set()
        self.ready: set[Connection] = set()  # with replies ready to be written
        self.flush_scheduled = False  # flush_ready is to run at the end of the loop turn
        self.hooked = False  # the store calls flush_ready after each batch's reply
        self.refused = 0
        self.listener: socket.socket | None = None
        self.accepting = False
        self._opening: set[asyncio.Task[Any]] = set()  # accepted, not yet connected
        self.opening = 0  # of those, the ones whose Connection is not made yet
        self._deferred: asyncio.TimerHandle | None = None  # accepting again then
        self.paused = False  # out of file descriptors: not accepting for ACCEPT_RETRY
        self.receiver: HandoverReceiver | None = None  # takes a reload's connections
        self.handed = 0  # connections handed to the new generation

    async def start(self) -> None:
        """Accept on the master's socket (or a socket of its own, when run alone)."""
        sock = self.ctx.listen_sock
        if sock is None:
            sock = bind_listener(self.settings.host, self.settings.port)
        self.handler.store.batch.on_batch_settled.append(self.flush_ready)
        self.hooked = True
        self.listener = sock
        self.accepting = True
        self._publish()
        self.handler.loop.add_reader(sock.fileno(), self._accept)
        if self.ctx.handover_sock is not None:
            self.receiver = HandoverReceiver(self.ctx.handover_sock, self.handler.loop,
                                             adopt=self.adopt, defer=self._busier,
                                             changed=self._publish)
            self.receiver.start()

    @property
    def load(self) -> int:
        streams = len(self.receiver.streams) if self.receiver is not None else 0
        return len(self.connections) + self.opening + streams

    def _busier(self) -> bool:
        """This process holds more connections than the least loaded other server."""
        board = self.ctx.board
        if board is None:
            return False
        least = board.least_other(self.ctx.board_slot)
        return least is not None and self.load > least

    def _publish(self) -> None:
        """Tell the other server processes how many connections this one holds (DRAINING:
        none, it does not accept now)."""
        if self.ctx.board is not None:
            self.ctx.board.set(self.ctx.board_slot, self.load
                               if self.accepting and not self.paused else LoadBoard.DRAINING)

    def _accept(self, force: bool = False) -> None:
        """Accept up to ACCEPT_BURST connections a loop turn, and none while this process
        holds more than the least loaded other server (the master's LoadBoard): every
        server waits on the master's socket, and the first awake would otherwise take them
        all (50 connections made together went 42 to one process, 8 to the other). After
        DEFER seconds of leaving them to the others (a server that boots, hangs or is
        stopped still counts until it is replaced), `force` takes a burst all the same."""
        assert self.listener is not None
        loop = self.handler.loop
        for _ in range(ACCEPT_BURST):
            if not force and self._busier():
                self._wait(DEFER)
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left, or another process took it
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the socket stays readable, so pause
                    # (as asyncio's own server does) rather than spin on it.
                    log.warning("cannot accept connections (%s); trying again in %g s",
                                exc.strerror, ACCEPT_RETRY)
                    self.paused = True
                    self._wait(ACCEPT_RETRY)
                return  # otherwise the peer gave up (ECONNABORTED...): the next one
            self.opening += 1
            task = loop.create_task(loop.connect_accepted_socket(
                functools.partial(Connection, self), sock))
            self._opening.add(task)
            task.add_done_callback(functools.partial(self._opened, sock))
            self._publish()

    def adopt(self, sock: socket.socket, pending: bytes, skipping: int) -> None:
        """Serve a connection a retiring server handed over, from where it stopped."""
        loop = self.handler.loop
        sock.setblocking(False)
        self.opening += 1
        task = loop.create_task(loop.connect_accepted_socket(functools.partial(
            Connection, self, pending, skipping, adopted=True), sock))
        self._opening.add(task)
        task.add_done_callback(functools.partial(self._opened, sock))
        self._publish()

    def _wait(self, seconds: float) -> None:
        """Stop watching the socket for `seconds`, then accept (a burst) again."""
        assert self.listener is not None
        loop = self.handler.loop
        loop.remove_reader(self.listener.fileno())
        self._deferred = loop.call_later(seconds, self._resume_accepting)
        self._publish()

    def _resume_accepting(self) -> None:
        self._deferred = None
        self.paused = False
        if self.accepting and self.listener is not None:
            self.handler.loop.add_reader(self.listener.fileno(), self._accept)
            self._publish()
            self._accept(force=True)

    def _opened(self, sock: socket.socket, task: asyncio.Task[Any]) -> None:
        self._opening.discard(task)
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.warning("cannot serve an accepted connection: %s", task.exception())
            self.opening -= 1  # its Connection was never made
            if sock.fileno() != -1:
                sock.close()
        self._publish()

    def stop_accepting(self) -> None:
        if not self.accepting or self.listener is None:
            return
        self.accepting = False
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        else:
            self.handler.loop.remove_reader(self.listener.fileno())
        self._publish()
        master = self.ctx.master_pid
        # Its own socket: nobody else accepts on it. The master's, once the master is gone
        # (kill -9): a new master can bind the port as soon as the orphans closed it,
        # while they still drain their connections.
        if self.ctx.listen_sock is None or (master is not None and os.getppid() != master):
            self.listener.close()

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

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.getsockname()[1])

    async def reap(self) -> None:
        """Close connections that idle too long or stall inside a frame."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            idle_timeout = self.settings.idle_timeout
            for conn in list(self.connections):
                # A frame stalls only while the server reads: not while it has paused
                # reading (a backlog, or a client slow to read its replies).
                stalled = (conn.reading and conn.frame_started
                           and now - conn.frame_started > FRAME_TIMEOUT)
                idle = (idle_timeout > 0 and not conn.busy
                        and now - conn.last_active > idle_timeout)
                if (stalled or idle) and conn.transport is not None:
                    if stalled:
                        conn.transport.write(protocol.error_reply((
                            BAD_REQUEST, f"the frame did not arrive in full within "
                            f"{FRAME_TIMEOUT:g}s; the connection is closed")))
                    conn.transport.close()

    def stop(self) -> None:
        """Closed down: the store no longer calls flush_ready (a reply made ready later
        is written at the end of its loop turn)."""
        if self.hooked:
            self.hooked = False
            self.handler.store.batch.on_batch_settled.remove(self.flush_ready)

    async def drain(self) -> None:
        """Stop accepting, answer every request already read, then hand each connection to
        the new generation (a reload) or close it (a stop)."""
        self.stop_accepting()
        if self.receiver is not None:  # connections being handed to us are ours to serve
            await self.receiver.settle(self.settings.grace)
        if self._opening:  # accepted just before: serve them like the others
            await asyncio.wait(self._opening, timeout=self.settings.grace)
        if self.ctx.hand_over:
            await self.hand_over()
        try:
            async with asyncio.timeout(self.settings.grace):
                while any(c.busy for c in self.connections):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("server: %d connections still busy after %.0fs grace",
                        sum(c.busy for c in self.connections), self.settings.grace)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()


    async def hand_over(self) -> None:
        """A reload: stop reading every connection, answer what was read, then pass each
        socket, with the bytes of a frame begun, to a server of the new generation. What
        cannot be handed within `grace` (a client that reads no replies) is closed once
        answered, as a stop would."""
        assert self.ctx.handover_sock is not None
        path = self.ctx.handover_sock.getsockname()
        loop = self.handler.loop
        deadline = loop.time() + self.settings.grace
        try:
            while True:
                waiting = False
                for conn in list(self.connections):
                    conn.stop_reading()
                    if conn.handable:
                        await self._hand(path, conn)
                    elif not conn.finishing:
                        waiting = True
                if not waiting or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.005)
        except (OSError, TimeoutError) as exc:
            log.warning("%s could not hand all its connections over (%s); the rest are "
                        "closed once answered", self.ctx.name, exc)
        left = sum(not c.finishing for c in self.connections)
        log.info("%s handed %d connections to the new generation%s", self.ctx.name,
                 self.handed, f"; {left} did not read their replies within "
                 f"{self.settings.grace:g} s and are closed" if left else "")

    async def _hand(self, path: str, conn: Connection) -> None:
        assert conn.transport is not None
        # A copy of the descriptor: the transport's own may close while the send waits.
        fd = os.dup(conn.transport.get_extra_info("socket").fileno())
        try:
            pending, skipping = conn.decoder.state()
            await hand(path, fd, pending, skipping)
        finally:
            os.close(fd)
        self.handed += 1
        conn.handed_over()


async def refresh_topics(topics: TopicCache, every: float) -> None:
    while True:
        await topics.refresh()
        await asyncio.sleep(every)


async def run(ctx: Context, store: Store | None = None, topics: TopicCache | None = None,
              ready: asyncio.Future[Any] | None = None) -> None:
    """The server role: serve until ctx.stopping is set, then drain."""
    settings = ctx.settings
    own_store = store is None
    registry = None
    if topics is None:
        registry = Registry(settings.db_url())
        topics = TopicCache(registry, refresh=settings.registry_refresh)
    if store is None:
        store = open_store(settings, await role_plan(ctx, registry))
    await topics.refresh(force=True)
    # The scripts in Redis before the first request: an add that finds them missing is
    # run again on its own, after a get pipelined behind it (which then misses the job).
    try:
        async with asyncio.timeout(settings.redis_timeout):
            await store.shards.load_scripts()
    except TimeoutError:
        log.warning("%s: a shard did not load the scripts within %g s; serving anyway",
                    ctx.name, settings.redis_timeout)
    server = Server(ctx, store, topics)
    await server.start()
    log.info("%s serving on port %d (%d shards)", ctx.name, server.port,
             len(store.shards.shards))
    ctx.ready.set()
    if ready is not None:
        ready.set_result(server)
    tasks = [asyncio.create_task(server.reap()),
             asyncio.create_task(refresh_topics(topics, settings.registry_refresh))]
    try:
        await ctx.stopping.wait()
        await server.drain()
    finally:
        server.stop()
        if server.receiver is not None:
            server.receiver.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if own_store:
            await store.shards.close()
        if registry is not None:
            registry.close()
        s = server.handler.stats
        log.info("%s stopped: add=%d get=%d del=%d fail=%d failover=%d refused=%d "
                 "adopted=%d handed=%d", ctx.name, s["add"], s["get"], s["del"], s["fail"],
                 s["failover"], server.refused,
                 server.receiver.adopted if server.receiver else 0, server.handed)
