"""Write batching: one script call per shard and loop turn for the scripts that take many
jobs per call (add, ack, evict).

`Batcher.queue` adds one job's part to its shard's batch without a coroutine (the server's
hot path); the batch goes out at the end of the loop turn, and each job's `Done` is told
its reply values, or the error that sent it nowhere. Once a batch's jobs were all told,
the `on_batch_settled` observers run: whoever acts on those results (the server's
Coalescer, dq/roles/server/replies.py, writes the replies they made ready) can do so once
per batch instead of once per job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from dq.errors import DqError
from dq.sharding.refusals import ReplicasBehind
from dq.sharding.shards import Shard
from dq.storage.fence import GivenUp
from dq.storage.scripts import SCRIPTS
from dq.storage.stats import MINUTE_TTL

if TYPE_CHECKING:
    from dq.storage.store import Store

log = logging.getLogger("dq.store")

# Most jobs in one batched script call (add, ack): a bigger batch (a burst of pipelined
# adds) is split, so no single call holds a shard for more than a few milliseconds.
ADD_BATCH = 500
# The scripts that take many jobs per call, and how many reply values each job gets.
BATCHED = {"add": 2, "ack": 1, "evict": 1}

# One job's part of a batched script call: its keys and its arguments. For an add:
# (delay key, wake key, stat key), (tid, payload, due or "", delay ms, guest 1|0).
Part = tuple[tuple[str, ...], tuple[Any, ...]]
AddJob = Part
# Called once per queued job: its reply values, or the error that sent it nowhere.
Done = Callable[[Any, BaseException | None], None]
AddDone = Done


def _to_future(fut: asyncio.Future[Any]) -> Done:
    def done(res: Any, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_result(res) if exc is None else fut.set_exception(exc)
    return done


class Batcher:
    """The batched script calls of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queued: dict[tuple[str, Shard], list[tuple[Part, Done]]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        # Observers called after a batch's jobs were all told their results (not from
        # within another batch's telling: then after that one); `settling` while telling.
        self.on_batch_settled: list[Callable[[], None]] = []
        self.settling = 0

    def args(self, script: str, parts: Sequence[Part], deadline: str = "") -> tuple[Any, ...]:
        """EVALSHA arguments of one call of a batched script (add, ack) for these jobs, all
        on one shard: the script's own keys and arguments, then each job's. An add call
        may carry a deadline on the shard's clock (dq/storage/fence.py)."""
        k = self.store.keys
        args: list[Any] = [self.store.clock.day(), MINUTE_TTL]
        if script == "add":
            keys = [k.jobs, k.inflight, k.dead, k.dead_err, k.minute(), k.guests]
            args.append(deadline)
        elif script == "evict":
            keys = [k.jobs, k.guests, k.moving, k.inflight, k.dead]
            args = []
        else:
            keys = [k.jobs, k.inflight, k.minute(), k.dead_err]
        for part_keys, part_args in parts:
            keys += part_keys
            args += part_args
        return (SCRIPTS[script][0], len(keys), *keys, *args)

    def add_args(self, jobs: Sequence[AddJob], deadline: str = "") -> tuple[Any, ...]:
        return self.args("add", jobs, deadline)

    def queue(self, script: str, shard: Shard, part: Part, done: Done) -> None:
        """Queue one job's call of a batched script without a coroutine (the server's hot
        path). What is queued for a shard in one loop turn goes out as one script call;
        `done` gets the job's reply values, or the error (NoScriptError when Redis lost its
        scripts, or an unavailable DqError) for the caller to retry via `Shard.evalsha`."""
        key = (script, shard)
        batch = self._queued.get(key)
        if batch is None:
            batch = self._queued[key] = []
            # the connection's loop: asyncio.get_running_loop() would cost a syscall
            loop = shard.conn.loop if shard.conn.connected else None
            (loop or asyncio.get_running_loop()).call_soon(self._send, script, shard)
        batch.append((part, done))

    def _send(self, script: str, shard: Shard) -> None:
        """The loop turn's batch for a shard, written at once (this runs after the turn's
        reads: nothing more joins it), each job told its result as soon as Redis answers."""
        items = self._queued.pop((script, shard))
        width = BATCHED[script]
        fence = self.store.fence
        fenced = script == "add" and fence.timeout > 0
        for i in range(0, len(items), ADD_BATCH):
            chunk = items[i:i + ADD_BATCH]
            done = [d for _, d in chunk]
            try:
                if fenced:
                    fence.send(shard, [part for part, _ in chunk], done)
                else:
                    shard.conn.send_then(functools.partial(self.settle, done, width),
                                         "EVALSHA",
                                         *self.args(script, [part for part, _ in chunk]))
            except Exception as exc:  # a bug here must fail these jobs, not strand them
                self.settle(done, width, None, exc)

    def settle(self, done: list[Done], width: int, res: Any, exc: BaseException | None,
               ) -> None:
        """A batch's reply (or error), handed to each of its jobs; then the
        `on_batch_settled` observers."""
        self.settling += 1
        try:
            for i, cb in enumerate(done):
                try:
                    cb(None if exc is not None else res[width * i:width * i + width], exc)
                except Exception:  # one job's bug must not strand the others
                    log.exception("a batched job's callback failed")
        finally:
            self.settling -= 1
        if not self.settling:
            for observer in self.on_batch_settled:
                try:
                    observer()
                except Exception:
                    log.exception("an after_settle hook failed")

    async def call(self, script: str, shard: Shard, part: Part, end: float = math.inf) -> Any:
        """One job's call of a batched script, sharing the loop turn's call when the
        shard's connection is up; otherwise (or when that fails) on its own (an add by `end`,
        its budget: dq/storage/fence.py)."""
        if shard.conn.connected and not shard.open_until:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.queue(script, shard, part, _to_future(fut))
            try:
                return await fut
            except ReplicasBehind:
                raise  # done on the master: doing it again alone would wait once more
            except GivenUp as exc:  # silent or too slow: the caller tries the next shard
                raise GivenUp(exc.err, exc.msg) from None  # (exc is its whole batch's)
            except (NoScriptError, DqError):
                pass  # Shard.evalsha below reloads scripts, reconnects, marks health
        if script == "add":
            return await self.store.add_once(shard, part, end)
        return await shard.evalsha(self.args(script, [part]))

    def evict(self, shard: Shard, part: Part) -> None:
        """Queue the eviction of an older copy of a job from `shard` (dq/storage/lua/evict.lua)."""
        self.queue("evict", shard, part, functools.partial(self._evicted, shard, part))

    def _evicted(self, shard: Shard, part: Part, res: Any, exc: BaseException | None) -> None:
        """An eviction that failed because Redis lost its scripts (a restart) is sent again
        on its own, which reloads them; any other failure is left to the sweep."""
        if isinstance(exc, NoScriptError):
            task = asyncio.ensure_future(shard.evalsha(self.args("evict", [part])))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("eviction failed: %s", task.exception())
