"""What a request does: validate it, run it against the Store, count and log it.

One Handler serves every connection of a server process. `fast` is the entry for each
started request (dq/roles/server/connection.py calls it): an add is validated, routed to
its shard and queued for the shard's next batch without a coroutine, its reply a Pending
set by the batch's callback; an add_many frame is its adds, each batched like one, gathered
by a _Many (dq/roles/server/replies.py); a get, a del, and an add whose batch failed (the
scripts not loaded, a shard down) run as a coroutine (`handle`, `_add_retry`), which may
fail an add over to the next healthy shard once. Every request ends in one "dq.request"
line (`log_request`) and a count in `stats`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import Any

from dq.errors import (
    NOT_FOUND,
    TOPIC_OFFLINE,
    UNAVAILABLE,
    UNKNOWN_TOPIC,
    DqError,
)
from dq.registry.core import Topic
from dq.registry.topics import TopicCache
from dq.roles.server.replies import Pending, _Many
from dq.runtime.context import Context
from dq.sharding.refusals import ReplicasBehind, ShardRefused
from dq.sharding.shards import Shard
from dq.storage.store import AddJob, GivenUp, Store
from dq.wire.frames import OK_EMPTY, Frame, error_reply, ok_reply
from dq.wire.requests import (
    AddRequest,
    DelRequest,
    GetRequest,
    parse_add,
    parse_many,
    parse_request,
)

log = logging.getLogger("dq.server")
request_log = logging.getLogger("dq.request")


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

    def fast(self, obj: Frame) -> bytes | Pending:
        """Answer a request, without a coroutine when it is an add on an open connection
        (the hot path): the reply is set when the shard answers the batch of adds this loop
        turn queued for it."""
        cmd = obj.get("cmd")
        if cmd != "add":
            return self.add_many(obj) if cmd == "add_many" else Pending.of(self.handle(obj))
        t0 = time.monotonic()
        try:
            req = parse_request(obj, tz=self.settings.zone)
            assert isinstance(req, AddRequest)
            shard, job = self._add_job(req)
        except DqError as exc:
            self.stats["fail"] += 1
            log_request("add", obj.get("topic"), obj.get("id"), exc.err, t0)
            return error_reply(exc)
        except Exception as exc:  # a bug must cost one reply, not the connection
            return self._unexpected(obj, exc)
        if not shard.conn.connected:
            return Pending.of(self.handle(obj))
        reply = Pending()

        def done(res: Any, exc: BaseException | None) -> None:
            if exc is None:
                self.stats["add"] += 1
                log_request("add", req.topic, req.id, "ok", t0, shard.label)
                reply.set(OK_EMPTY)
                return
            if isinstance(exc, ReplicasBehind):  # on the master: not to be stored elsewhere
                reply.set(error_reply(self._behind(req, shard, t0, exc)))
                return
            # scripts not loaded yet, or an error: the ordinary path retries or explains
            slow = Pending.of(self._add_slow(shard, job, req, t0, exc))
            slow.on_set = lambda: reply.set(slow.data or b"")

        self.store.add_nowait(shard, job, done)
        return reply

    def add_many(self, obj: Frame) -> bytes | Pending:
        """An add_many frame: each job is an add of its own (validated, routed and batched
        like one), and the one reply lists their results in order."""
        t0 = time.monotonic()
        try:
            items = parse_many(obj)
        except DqError as exc:
            self.stats["fail"] += 1
            log_request("add_many", None, None, exc.err, t0)
            return error_reply(exc)
        many = _Many(self, len(items), t0)
        parse, zone, add_job, add_nowait = (parse_add, self.settings.zone,
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
                self._many_slow(many, i, None)
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

    def _many_slow(self, many: _Many, i: int, exc: BaseException | None) -> None:
        """A job of an add_many frame the batch could not store (`exc`), tried once more
        alone."""
        sent = many.sent[i]
        assert sent is not None
        req, shard, job = sent
        many.sent[i] = None  # it is counted and logged by _add_retry

        def done(task: asyncio.Task[DqError | None]) -> None:
            many.set(i, DqError(UNAVAILABLE, "the server is stopping; retry on another dq "
                                "server") if task.cancelled() else task.result())

        asyncio.ensure_future(self._add_retry(shard, job, req, many.t0, exc)
                              ).add_done_callback(done)

    def _many_stored(self, many: _Many) -> None:
        """Count (and log) an add_many frame's jobs its batches stored, once they all have
        their results."""
        added = [sent for sent, res in zip(many.sent, many.results, strict=True)
                 if sent is not None and res is None]
        self.stats["add"] += len(added)
        if request_log.isEnabledFor(logging.INFO):
            for req, shard, _ in added:
                log_request("add", req.topic, req.id, "ok", many.t0, shard.label)

    async def _add_slow(self, shard: Shard, job: AddJob, req: AddRequest, t0: float,
                        failed: BaseException | None = None) -> bytes:
        error = await self._add_retry(shard, job, req, t0, failed)
        return OK_EMPTY if error is None else error_reply(error)

    async def _add_retry(self, shard: Shard, job: AddJob, req: AddRequest, t0: float,
                         failed: BaseException | None = None) -> DqError | None:
        """An add the batch could not store (`failed`: scripts not loaded, an error, a
        shard down), tried once more on its own: None when stored, else the error for its
        client. An add given up on its shard (GivenUp: silent or too slow) goes to the
        next shard at once. The tries share the add's budget (Fence.budget_end) from `t0`."""
        end = self.store.fence.budget_end(t0)
        try:
            error: DqError | None = failed if isinstance(failed, GivenUp) else None
            if error is None:
                try:
                    await self.store.add_once(shard, job, end)
                except DqError as exc:
                    if exc.err != UNAVAILABLE or isinstance(exc, ShardRefused):
                        raise
                    error = exc
            if error is not None:
                # Its shard is down (and maybe not yet known to be): write to the next
                # healthy shard in the tid's order instead, once; get/del look there too.
                owner = shard
                shard, job = self._add_job(req, exclude=(owner.name,))
                if shard is owner:  # a fresh error: `failed` is every job's of its batch
                    raise DqError(error.err, error.msg) from None
                self.stats["failover"] += 1
                await self.store.add_once(shard, job, self.store.fence.next_end(end))
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
        return error_reply(self._unexpected_error(obj, exc))

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

    async def handle(self, obj: Frame) -> bytes:
        t0 = time.monotonic()
        try:
            req = parse_request(obj, tz=self.settings.zone)
            if isinstance(req, AddRequest):
                return await self._add_slow(*self._add_job(req), req, t0)
            if isinstance(req, GetRequest):
                body = await self.store.get(req.topic, req.id)
                self.stats["get"] += 1
                if body is None:
                    raise DqError(NOT_FOUND, f"no job {req.id!r} in topic {req.topic!r}: it was "
                                  "never added, was deleted, or has been delivered")
                log_request("get", req.topic, req.id, "ok", t0)
                return ok_reply(body)
            if isinstance(req, DelRequest):
                deleted = await self.store.delete(req.topic, req.id)
                self.stats["del"] += 1
                if not deleted:
                    raise DqError(NOT_FOUND, f"no job {req.id!r} in topic {req.topic!r} to "
                                  "delete: it was never added, was deleted, or was delivered")
                log_request("del", req.topic, req.id, "ok", t0)
                return OK_EMPTY
            return OK_EMPTY  # ping
        except DqError as exc:
            self.stats["fail"] += 1
            log_request(str(obj.get("cmd")), obj.get("topic"), obj.get("id"), exc.err, t0,
                        error=exc.msg if exc.err == UNAVAILABLE else "")
            return error_reply(exc)
        except Exception as exc:
            return self._unexpected(obj, exc)

