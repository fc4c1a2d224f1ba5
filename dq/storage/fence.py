"""Adds answered within `add_timeout`, even when their shard hangs, without two copies.

A shard that stops answering (a stopped process, a host that drops packets) keeps its
connection open: nothing fails until `redis_timeout` (5 s). The PHP client gives up after
1 s. So an add call on a shard that has been silent for `add_timeout` (0.4 s: no reply to
anything on its connection; a shard that answers slowly is waited for) is given up: its
jobs are told "unavailable", and the server writes them to the next shard in their
rendezvous order, as for a shard that is down; when another shard can take its adds, the
silent one is passed over for a while (its breaker opens, dq/sharding/shards.py).

The call given up is still on its way, and the shard may run it when it wakes up. Two
things keep that late run from leaving a second live copy of the job:

- the call carries a deadline on the shard's own clock (add.lua's ARGV[3]): `add_timeout`
  after it was sent, built from a comparison of the clocks that can only err early
  (dq/sharding/resp.py `deadline`). A call can only be given up after that, so a shard that wakes
  and runs it then writes nothing (LATE). (A slow shard that runs it late, not given up,
  refuses it too: a batch's jobs then go to the next shard; a lone add is sent again,
  with a new deadline, within the add's budget.)
- a call that ran in time but whose answer came after it was given up (the shard stopped
  between running it and answering) has the copies it wrote removed at once, each only if
  it is still the version that call wrote (guest_land.lua 'undo'), so a later add of the
  job is kept, and only if another shard holds the job (the add written there instead):
  a copy that is the job's only one stays, as it may have replaced a job stored before;
  a call whose connection was dropped before it answered is treated the same as soon as
  the shard answers again (for up to UNDO_FOR seconds).

The whole add has a budget too (`Fence.budget_end`): add_timeout plus ADD_SPARE from when the
server read it. A shard that answers, but too slowly to meet it (one that wakes from a
stall and works through its backlog, or answers MOVED after its failover) is waited for
SLOW_SPARE past the timeout at most; a second try on the same shard gets what is left of
the budget, and one on the next shard that, but NEXT_TRY at least: the client is told
"unavailable" (or that the add was stored on the next shard) within about add_timeout +
ADD_SPARE (0.5 s by default), never after a chain of waits. An add given up on its shard
(silent, too slow, or run there after its deadline: GivenUp) is not tried there again.

What stays: in that last case, both copies exist until the removal (a round trip), and a
shard that ran an add in time, then stayed silent past UNDO_FOR (or a server process killed
meanwhile) keeps that copy; the guest mover (dq/storage/guests.py) keeps the later of the two
when it is back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.refusals import ReplicasBehind, ShardRefused
from dq.sharding.shards import Shard

if TYPE_CHECKING:
    from dq.storage.batch import AddJob, Done
    from dq.storage.store import Store

log = logging.getLogger("dq.fence")

UNDO_FOR = 600.0  # seconds a late add's copies are waited for, to be removed
UNDO_RETRY = 1.0  # seconds between tries while the shard does not answer
LATE_TRIES = 3  # an add the shard refused as late is sent again this many times in all
RECHECK = 0.02  # seconds to look again at a shard not yet known to be silent
SLOW_SPARE = 0.04  # seconds past the timeout a shard that answers, slowly, is waited for
ADD_SPARE = 0.1  # seconds past the timeout in which a whole add (and its retries) is answered
NEXT_TRY = 0.05  # seconds a try on the next shard has at least, the budget spent or not


class GivenUp(DqError):
    """An add given up on its shard ("unavailable"): silent, too slow, or it ran the add
    after its deadline. The add is not tried on that shard again; the next one may take
    it, within what is left of the add's budget."""


@dataclass(eq=False)
class _Batch:
    """One fenced call of add.lua: its jobs' callbacks until answered or given up."""

    shard: Shard
    parts: list[AddJob]
    done: list[Done]
    sent: float  # monotonic
    timer: asyncio.TimerHandle | None = None
    answered: bool = False
    given_up: bool = False  # its jobs were told it failed: an answer now is late


def _late_error(exc: BaseException | None) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("LATE")


@dataclass(eq=False)
class Fence:
    """The add deadline of one Store (`timeout` seconds; 0: none)."""

    store: Store
    timeout: float
    late: int = 0  # calls answered, or lost, after they were given up
    undone: int = 0  # copies those calls wrote, removed
    _given_up: dict[str, float] = field(default_factory=dict)  # shard -> monotonic
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def budget_end(self, t0: float) -> float:
        """When an add the server read at `t0` (monotonic) must have its answer, retries
        included (inf without an add_timeout)."""
        return t0 + self.timeout + ADD_SPARE if self.timeout else math.inf

    def next_end(self, end: float) -> float:
        """The end of a try on the next shard, once the add's own shard failed: the
        budget's, but at least NEXT_TRY from now (a healthy shard answers in a
        millisecond; a loop running late must not turn a storable add away)."""
        return max(end, time.monotonic() + NEXT_TRY) if self.timeout else end

    def _why(self) -> str:
        return f"did not answer an add within add_timeout ({self.timeout:g} s)"

    def _wait_left(self, shard: Shard, since: float, end: float) -> float:
        """Seconds a call sent at `since` is still waited for; <= 0: give it up. It is
        given up when `shard` is silent (connected, nothing heard on its connection for the
        timeout since `since` or its last reply, whichever is later), when it answers but
        too slowly (SLOW_SPARE past the timeout), or at `end` (the add's budget); never
        while an answer waits in the socket unread (a loop too busy to read what came).
        A connection still being made is waited for until `end` (its own timeout bounds
        it)."""
        now = time.monotonic()
        silent = max(shard.conn.heard, since) + self.timeout - now
        left = min(silent, since + self.timeout + SLOW_SPARE - now, end - now)
        if left <= 0 and (shard.conn.unread() or (
                not shard.conn.connected and silent <= 0 and end > now)):
            return RECHECK
        return left

    def _give_up(self, shard: Shard) -> GivenUp:
        """The shard is silent: pass it over for a while when another shard can take its
        adds (with none, it is still tried: a stall may end)."""
        self._given_up[shard.name] = time.monotonic()
        shard.conn.silent()  # a cluster partition reads its slot map again
        if any(s.up for s in self.store.shards.shards if s is not shard):
            shard.suspect(self._why())
        return GivenUp(UNAVAILABLE, f"redis shard {shard.label} {self._why()}; retry shortly")

    def _deadline(self, shard: Shard) -> str:
        # The earliest this process may give up on the call: the shard must have been
        # silent for the timeout since it was sent. A call that runs later writes nothing
        # (LATE); if it was not given up (a shard that answers slowly), it is sent again.
        return shard.conn.deadline(self.timeout)

    def send(self, shard: Shard, parts: list[AddJob], done: list[Done]) -> None:
        """Send one batch of adds, each job told its result by the answer or, when the
        shard is silent for the timeout, "unavailable" (and the shard is passed over)."""
        batch = _Batch(shard, parts, done, time.monotonic())
        deadline = self._deadline(shard)
        if not deadline:  # its clock not compared (a connection just made elsewhere)
            self.store.batch.settle(done, 2, None, DqError(
                UNAVAILABLE, f"redis shard {shard.label}: its clock is not compared yet"))
            return  # each add is tried again alone, which connects and compares
        args = self.store.batch.args("add", parts, deadline)
        shard.conn.send_then(functools.partial(self._answered, batch), "EVALSHA", *args)
        if not batch.answered:  # not connected: told at once
            loop = shard.conn.loop or asyncio.get_running_loop()
            batch.timer = loop.call_later(self.timeout, self._overdue, batch, False)

    def _answered(self, batch: _Batch, res: Any, exc: BaseException | None) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.given_up:
            self._late(batch.shard, batch.parts, res, exc)
            return
        batch.answered = True
        if _late_error(exc):
            exc = self._ran_late(batch.shard)
        self.store.batch.settle(batch.done, 2, res, exc)

    def _overdue(self, batch: _Batch, again: bool) -> None:
        if batch.answered:
            return
        loop = batch.shard.conn.loop or asyncio.get_running_loop()
        # A batch went out on a live connection: none is being made for it. (A cluster
        # partition's current connection may be another node's, not yet opened, once its
        # map has moved the slot: the batch is not waited for on that account.)
        left = self._wait_left(batch.shard, batch.sent,
                               batch.sent + self.timeout + SLOW_SPARE)
        if left > 0:  # it answers, slowly: wait on
            batch.timer = loop.call_later(left, self._overdue, batch, False)
            return
        if not again:
            # Once more after the loop has read its sockets: a loop that stalled (not a
            # silent shard) may find the answer waiting there (libuv runs due timers
            # before it polls).
            batch.timer = loop.call_later(0.001, self._overdue, batch, True)
            return
        batch.given_up = True
        self.store.batch.settle(batch.done, 2, None, self._give_up(batch.shard))

    async def add_once(self, shard: Shard, job: AddJob, end: float = math.inf) -> Any:
        """One add on `shard` on its own (not batched): its reply values, or DqError
        "unavailable" when the shard fails, is passed over, is still silent since an add
        was given up there, is silent for the timeout now, or the add's budget runs out
        (`end`, monotonic: see budget_end)."""
        if not self.timeout:
            return await shard.evalsha(self.store.batch.add_args([job]))
        if shard.conn.heard < self._given_up.get(shard.name, 0.0):
            raise GivenUp(UNAVAILABLE, f"redis shard {shard.label} {self._why()}; retry "
                          "shortly")  # still silent since an add was given up there
        if end <= time.monotonic():
            raise self._spent(shard)
        return await self._attempts(shard, job, end)

    async def _attempts(self, shard: Shard, job: AddJob, end: float) -> Any:
        """add_once's tries: again with a new deadline while the shard refuses one as
        run late (up to LATE_TRIES), until it is silent or too slow, or `end`. Each try is
        waited for from when it went out, its deadline built then, so that it is never
        given up before the shard would refuse to run it; before it goes out (its
        connection being made), only `end` bounds it."""
        sent: list[float] = []  # when the current try went out

        async def attempt() -> Any:
            sent.clear()
            if not shard.conn.connected:
                await shard.connect()  # compares the clocks: the deadline needs them
            now = time.monotonic()
            # run by the shard no later than this try may be waited for
            deadline = shard.conn.deadline(max(min(self.timeout, end - now), 0.0))
            if not deadline:
                raise DqError(UNAVAILABLE, f"redis shard {shard.label}: its clock is not "
                              "compared yet, so an add there could not be fenced; retry "
                              "shortly")
            sent.append(now)
            return await shard.evalsha(self.store.batch.add_args([job], deadline))

        task = asyncio.ensure_future(attempt())
        tries = 1
        try:
            while True:
                left = (self._wait_left(shard, sent[0], end) if sent
                        else end - time.monotonic())
                if left <= 0:
                    break
                done, _ = await asyncio.wait({task}, timeout=left)
                if done:
                    try:
                        return task.result()
                    except ResponseError as exc:
                        if not _late_error(exc):
                            raise
                        if tries >= LATE_TRIES:
                            raise self._ran_late(shard) from None
                    # Run late, so not written: a slow shard, or a busy loop that sent it
                    # late (or after reloading the scripts). Again, with a new deadline.
                    tries += 1
                    task = asyncio.ensure_future(attempt())
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._late_task, shard, [job]))
            raise
        task.add_done_callback(functools.partial(self._late_task, shard, [job]))
        if time.monotonic() >= end:
            raise self._spent(shard)
        raise self._give_up(shard)

    @staticmethod
    def _ran_late(shard: Shard) -> GivenUp:
        return GivenUp(UNAVAILABLE, f"redis shard {shard.label} ran an add after its deadline "
                       "and refused it; retry shortly")

    def _spent(self, shard: Shard) -> GivenUp:
        """The add's budget ran out (its first shard was given up on, or answered too
        slowly): "unavailable", without passing `shard` over for it."""
        return GivenUp(UNAVAILABLE, f"an add was not stored within add_timeout "
                       f"({self.timeout:g} s) and its retry on redis shard {shard.label} ran "
                       "out of time; retry shortly")

    def _late_task(self, shard: Shard, parts: list[AddJob], task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            self._late(shard, parts, None, DqError(UNAVAILABLE, "cancelled"))
        else:
            self._late(shard, parts, task.result() if task.exception() is None else None,
                       task.exception())

    def _late(self, shard: Shard, parts: list[AddJob], res: Any,
              exc: BaseException | None) -> None:
        """The answer (or loss) of an add call its jobs were told had failed."""
        self.late += 1
        if isinstance(exc, ResponseError) and str(exc).startswith("LATE"):
            log.debug("redis shard %s refused %d late add(s), as meant", shard.label,
                      len(parts))
            return
        if exc is not None and (not isinstance(exc, DqError) or exc.err != UNAVAILABLE
                                or (isinstance(exc, ShardRefused)
                                and not isinstance(exc, ReplicasBehind))):
            return  # refused: nothing written (short of replicas: written on the master)
        # Written in time but answered late (res), or unknown (the connection was lost):
        # their copies there, if any, must go.
        task = asyncio.ensure_future(self._undo(shard, parts, written=exc is None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _undo(self, shard: Shard, parts: list[AddJob], *, written: bool) -> None:
        st = self.store
        until = time.monotonic() + UNDO_FOR
        left = list(parts)
        undone = 0
        while left:
            _, (tid, payload, *_rest) = left[0]
            version = str(payload).split("|", 1)[0]
            b = st.keys.bucket(tid)
            keys = (st.keys.jobs, st.keys.delay[b], st.keys.wake[b], st.keys.inflight, st.keys.dead,
                    st.keys.dead_err)
            try:
                if not await self._copy_elsewhere(shard, tid):
                    # The only copy of the job (nothing was written elsewhere: one shard,
                    # or the others failed too): removing it would lose the job, and the
                    # one it replaced, which the client had stored before.
                    left.pop(0)
                    continue
                res = await shard.script("guest_land", keys, (tid, "undo", version, "", 0, 0))
            except (DqError, ResponseError, OSError) as exc:
                if time.monotonic() >= until:
                    log.error("redis shard %s: %d add(s) given up on may be stored there "
                              "too; it did not answer for %.0f s (%s); the guest mover keeps "
                              "the later copy when it does", shard.label, len(left),
                              UNDO_FOR, exc)
                    return
                await asyncio.sleep(UNDO_RETRY)
                continue
            left.pop(0)
            undone += res == b"undone"
        self.undone += undone
        if undone or written:
            log.warning("redis shard %s stored %d of %d add(s) after they were given up "
                        "(add_timeout) and written elsewhere or refused: removed there",
                        shard.label, undone, len(parts))

    async def _copy_elsewhere(self, shard: Shard, tid: str) -> bool:
        """Whether a shard other than `shard` holds the job (the add written there instead,
        once this one was given up); a shard that does not answer counts as holding none."""
        others = [s for s in self.store.shards.shards if s is not shard]
        found = await asyncio.gather(*(s.call("HEXISTS", self.store.keys.jobs, tid)
                                       for s in others), return_exceptions=True)
        return any(f == 1 for f in found)

    async def close(self) -> None:
        """Wait (briefly) for removals under way; what is left is the guest mover's."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
