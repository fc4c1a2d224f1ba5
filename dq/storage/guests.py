"""Guests: jobs written to a shard while their owner was down, and how they go home.

An add whose owner shard is down goes to the next shard in the tid's order and is
recorded in that shard's guests set (dq/storage/lua/add.lua). Left there, a job added during an
outage and again after it would exist twice and fire twice. The checker (dq/roles/checker/)
runs `GuestMover.sweep` on every shard each round; each guest whose owner answers moves
in four steps, each an atomic script:

1. take (guest_take.lua, on its shard): out of its delay bucket, marked in the moving hash;
2. land (guest_land.lua, on the owner): written unscheduled, unless the owner's copy is as
   new or newer;
3. drop (guest_drop.lua, on its shard): the copy there removed, the mark "|d";
4. commit (guest_land.lua, on the owner): scheduled; then the mark is cleared.

The mark outlives a mover that dies, so a later sweep finishes or undoes any move; several
movers may run at once. The shard list may change between a mover's death and that sweep,
and with it the owner: a copy it landed is then looked for on every shard, and moved from
there to the owner (or undone, when the job was added again since). Meanwhile adds on a
job's owner evict its older copies from shards known to hold guests (Store.add_job,
dq/storage/lua/evict.lua).

The scripts answer in words, named here per script (`Take`, `Land`, `Drop`: guest_land's
and guest_drop's "kept" mean different things); what a sweep counts for each guest is
an `Outcome`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

from dq.errors import DqError
from dq.sharding.shards import Shard
from dq.storage.payload import decode
from dq.storage.store import Store

log = logging.getLogger("dq.guests")

BATCH = 500  # guests read (SSCAN COUNT) and moved concurrently at a time


class Take(StrEnum):
    """What guest_take.lua found here, and what the move needs next."""

    TAKE = "take"  # taken out of its bucket: land it on the owner, then drop it here
    COMMIT = "commit"  # dropped here already: commit it on the owner, then finish
    CHANGED = "changed"  # marked, but deleted or replaced here since: undo, then drop
    DEAD = "dead"  # marked, and it died here since: undo, then forget (it stays here)
    GONE = "gone"  # no such job here any more (delivered or deleted): forgotten
    STAY = "stay"  # a dead letter: it stays here, forgotten as a guest
    BUSY = "busy"  # being delivered here: later


class Land(StrEnum):
    """guest_land.lua's answer on the owner, per mode (land, commit, undo)."""

    LANDED = "landed"  # land: written unscheduled (or already there)
    OWNER = "owner"  # land: the owner's copy is as new or newer; nothing written
    COMMITTED = "committed"  # commit: scheduled
    SKIPPED = "skipped"  # commit: the copy there is another version
    NONE = "none"  # commit: no copy there (deleted, or landed on another shard)
    UNDONE = "undone"  # undo: this version's copy removed
    OTHER_VERSION = "kept"  # undo: the copy there is another version, left alone


class Drop(StrEnum):
    """guest_drop.lua's answer here, per mode (drop, finish, untake, forget)."""

    DROPPED = "dropped"  # the copy here removed (the mark "|d" until finished)
    FINISHED = "finished"  # a "|d" mark cleared
    UNTAKEN = "untaken"  # back in its bucket here (the mark "|u")
    FORGOTTEN = "forgotten"  # the mark cleared and the guest forgotten (a dead letter)
    CHANGED = "changed"  # deleted or replaced here since the take
    PUT_BACK = "kept"  # another mover finished this take first; the job is here again
    GONE = "gone"  # another mover finished this take first


class Outcome(StrEnum):
    """What a sweep counts for each guest (its counts are keyed by these values)."""

    MOVED = "moved"  # now on its owner, scheduled
    SUPERSEDED = "superseded"  # the owner's copy was as new or newer: this one dropped
    OWNED = "owned"  # its shard owns it now (the shard list changed)
    UNSURE = "unsure"  # the land's reply was lost: the next sweep finishes or undoes it
    BUSY = "busy"  # left for a later sweep (delivered here, or a shard does not answer)
    ERROR = "error"  # the move failed (logged unless a shard was unavailable)
    CHANGED = "changed"  # deleted or replaced here during its move: it stays here
    GONE = "gone"  # no longer here (delivered, deleted, or moved by another mover)
    STAY = "stay"  # a dead letter: stays here, no longer a guest
    DEAD = "dead"  # died here during its move: stays here, no longer a guest
    # a take put back in its bucket here (its owner is down): guest_drop's words
    UNTAKEN = "untaken"
    PUT_BACK = "kept"
    DROPPED = "dropped"
    FINISHED = "finished"
    FORGOTTEN = "forgotten"


class _Keys(NamedTuple):
    """The keys of one tid's guest scripts (take, land on the owner, drop here)."""

    take: tuple[str, ...]
    land: tuple[str, ...]
    drop: tuple[str, ...]


class GuestMover:
    """Moves the guests of a store's shards home. Keeps, per shard, where its last sweep
    stopped, so a sweep cut short by its deadline goes on from there next time."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cursor: dict[str, int] = {}

    async def count(self, shard: Shard) -> int:
        """How many guests `shard` holds (jobs whose owner is another shard)."""
        return int(await shard.call("SCARD", self.store.keys.guests))

    async def sweep(self, shard: Shard, usable: Callable[[Shard], bool], *,
                    deadline: float | None = None) -> collections.Counter[str]:
        """Move the guests on `shard` home to their owners, where `usable` says the owner
        answers; the outcome of each, counted. One pass over the guests set (SSCAN, up to
        BATCH at a time, moved concurrently), or until time.monotonic() passes
        `deadline`; the next call goes on from there. Safe to run from several processes at
        once, and to be killed at any point: a job taken out of its bucket here is marked
        moving, and a later sweep finishes or undoes the move."""
        st = self.store
        counts = await self.put_back_stranded(shard, usable)
        cursor = self._cursor.get(shard.name, 0)
        while True:
            cursor, found = await shard.call("SSCAN", st.keys.guests, cursor, "COUNT",
                                             BATCH)
            cursor = int(cursor)
            tids = [t.decode() for t in found]
            tids = [t for t in tids if usable(owner := st.shards.owner(t)) or owner is shard]
            done = await asyncio.gather(*(self._move_home(shard, t, usable) for t in tids),
                                        return_exceptions=True)
            for tid, outcome in zip(tids, done, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, DqError):
                        log.error("moving guest %r home failed", tid, exc_info=outcome)
                    counts[Outcome.ERROR.value] += 1
                else:
                    counts[outcome.value] += 1
            if not cursor or (deadline is not None and time.monotonic() >= deadline):
                break
        self._cursor[shard.name] = cursor
        return counts

    async def put_back_stranded(self, shard: Shard, usable: Callable[[Shard], bool],
                                ) -> collections.Counter[str]:
        """Jobs on `shard` a mover took out of their bucket and did not finish moving,
        whose owner `usable` says is down now: back in their bucket here, to fire here.
        Their marks stay (as "|u") until a sweep can reach the owner. Cheap: the moving
        hash is empty unless a mover stopped midway."""
        st = self.store
        counts = collections.Counter[str]()
        marks = await shard.call("HGETALL", st.keys.moving)
        for raw, mark in zip(marks[::2], marks[1::2], strict=True):
            tid = raw.decode()
            if mark.count(b"|") == 1 and not usable(st.shards.owner(tid)):
                counts[(await shard.script("guest_drop", self._keys(tid).drop, (
                    tid, "untake", mark.split(b"|")[0]))).decode()] += 1  # Drop's words
        return counts

    def _keys(self, tid: str) -> _Keys:
        st, b = self.store, self.store.keys.bucket(tid)
        return _Keys(
            take=(st.keys.jobs, st.keys.delay[b], st.keys.dead, st.keys.guests, st.keys.moving),
            land=(st.keys.jobs, st.keys.delay[b], st.keys.wake[b], st.keys.inflight, st.keys.dead,
                  st.keys.dead_err),
            drop=(st.keys.jobs, st.keys.delay[b], st.keys.guests, st.keys.moving, st.keys.wake[b]))

    async def _move_home(self, here: Shard, tid: str,
                         usable: Callable[[Shard], bool]) -> Outcome:
        """One guest's move (or the rest of a move a mover left midway); its outcome."""
        owner = self.store.shards.owner(tid)
        keys = self._keys(tid)
        if owner is here:  # the shard list changed: this shard owns it now
            return await self._owned(here, tid, keys, usable)
        res = await here.script("guest_take", keys.take, (tid,))
        status, payload, due, version = (Take(res[0].decode()), res[1], int(res[2]),
                                         res[3].decode())
        if status not in (Take.TAKE, Take.CHANGED, Take.DEAD, Take.COMMIT):
            return Outcome(status.value)  # gone, stay (a dead letter) or busy
        if not usable(owner):
            if status != Take.TAKE:
                return Outcome.BUSY  # the rest needs the owner
            # down again since the sweep began: back in its bucket here
            return Outcome((await here.script("guest_drop", keys.drop,
                                              (tid, "untake", version))).decode())
        if status == Take.COMMIT:  # a mover stopped after dropping the copy here: finish it
            return await self._commit(owner, here, tid, version, due, keys, usable)
        if status != Take.TAKE:
            # An earlier move stopped midway (maybe after landing this version on the
            # owner, or on the owner of an earlier shard list), and the job changed or
            # died here since: undo those copies first.
            if not await self._undo(owner, here, tid, version, keys, usable):
                return Outcome.BUSY  # a shard that may hold a copy does not answer
            await here.script("guest_drop", keys.drop,
                              (tid, "forget" if status == Take.DEAD else "drop", version))
            return Outcome(status.value)
        return await self._move(owner, here, tid, payload, due, version, keys)

    async def _move(self, owner: Shard, here: Shard, tid: str, payload: bytes, due: int,
                    version: str, keys: _Keys) -> Outcome:
        """Land, drop and commit a job just taken."""
        try:
            landed = Land((await owner.script("guest_land", keys.land, (
                tid, "land", version, payload, due, decode(payload).set_ms))).decode())
        except DqError:
            # Maybe written, maybe not (a lost reply): the mark stays, and the next sweep
            # lands it again (a no-op if it is there) or, the owner being down, puts it back.
            return Outcome.UNSURE
        dropped = Drop((await here.script("guest_drop", keys.drop,
                                          (tid, "drop", version))).decode())
        if landed == Land.LANDED and dropped in (Drop.CHANGED, Drop.PUT_BACK):
            # deleted or replaced here meanwhile (or put back by another mover): the copy
            # just written on the owner, not yet scheduled, must not fire
            await owner.script("guest_land", keys.land, (tid, "undo", version, "", 0, 0))
            return Outcome.CHANGED
        if dropped != Drop.DROPPED:  # changed here since, or another mover finished it
            return Outcome.CHANGED if dropped == Drop.CHANGED else Outcome.GONE
        # The copy here is gone: now the owner's may be scheduled (a commit of a version
        # the owner no longer holds, superseded or deleted since, does nothing).
        await self._commit(owner, here, tid, version, due, keys)
        return Outcome.MOVED if landed == Land.LANDED else Outcome.SUPERSEDED

    async def _commit(self, owner: Shard, here: Shard, tid: str, version: str, due: int,
                      keys: _Keys, search: Callable[[Shard], bool] | None = None) -> Outcome:
        """Schedule the copy landed on the owner, then clear the mark here. Finishing a
        move a mover left (`search`: which shards answer), the owner may not hold that
        version: the land may have gone to another shard, the owner of the shard list
        of then, and `_adopt` brings it from there; "busy" (the mark stays) while a shard
        that may hold it does not answer."""
        committed = Land((await owner.script("guest_land", keys.land,
                                             (tid, "commit", version, "", due, 0))).decode())
        if committed in (Land.NONE, Land.SKIPPED) and search is not None \
                and not await self._adopt(owner, here, tid, version, due, keys, search):
            return Outcome.BUSY
        await here.script("guest_drop", keys.drop, (tid, "finish", version))
        return Outcome.MOVED

    def _elsewhere(self, owner: Shard, here: Shard,
                   usable: Callable[[Shard], bool]) -> tuple[list[Shard], bool]:
        """The shards other than `owner` and `here` that answer, and whether all do."""
        others = [s for s in self.store.shards.shards if s is not owner and s is not here]
        reached = [s for s in others if usable(s)]
        return reached, len(reached) == len(others)

    async def _adopt(self, owner: Shard, here: Shard, tid: str, version: str, due: int,
                     keys: _Keys, usable: Callable[[Shard], bool]) -> bool:
        """A dropped move whose landed copy is not on the owner: look for it on the other
        shards (a mover of an earlier shard list landed it on its owner of then), and move
        it from there as a guest is moved: land on the owner (which keeps a copy written
        as late or later), undo it there, commit. When the job has been added here again
        since the drop, that later add wins: the copy is only undone. False when it was
        not found and a shard that may hold it does not answer."""
        st = self.store
        reached, everywhere = self._elsewhere(owner, here, usable)
        added_again = bool(await here.call("HEXISTS", st.keys.jobs, tid))
        for shard in reached:
            raw = await shard.call("HGET", st.keys.jobs, tid)
            if raw is None or decode(raw).version != version:
                continue
            landed = None
            if not added_again:
                landed = Land((await owner.script("guest_land", keys.land, (
                    tid, "land", version, raw, due, decode(raw).set_ms))).decode())
            await shard.script("guest_land", keys.land, (tid, "undo", version, "", 0, 0))
            if landed == Land.LANDED:
                await owner.script("guest_land", keys.land,
                                   (tid, "commit", version, "", due, 0))
            log.warning("guest %s: its landed copy was on %s, no longer its owner (the shard "
                        "list changed during a move); %s", tid, shard.label,
                        f"moved to {owner.label}" if landed == Land.LANDED
                        else "a later add of the job wins")
            return True
        return everywhere

    async def _undo(self, owner: Shard, here: Shard, tid: str, version: str, keys: _Keys,
                    usable: Callable[[Shard], bool]) -> bool:
        """Remove the version's copies an unfinished move may have landed (unscheduled),
        on the owner and on the other shards (an owner of an earlier shard list), not
        here; False when a shard that may hold one does not answer."""
        reached, everywhere = self._elsewhere(owner, here, usable)
        for shard in [owner, *reached] if owner is not here else reached:
            await shard.script("guest_land", keys.land, (tid, "undo", version, "", 0, 0))
        return everywhere

    async def _owned(self, here: Shard, tid: str, keys: _Keys,
                     usable: Callable[[Shard], bool]) -> Outcome:
        """A guest whose shard is now its owner (the shard list changed): no longer a guest.
        A take a mover left unfinished goes back in its bucket, and copies it may have
        landed elsewhere are undone; the copy of a move that had dropped it here is
        brought back from where it landed (`_adopt`)."""
        mark = await here.call("HGET", self.store.keys.moving, tid)
        if mark is not None:
            version, due = mark.split(b"|")[0].decode(), int(mark.split(b"|")[1])
            dropped = mark.endswith(b"|d") or Drop((await here.script(
                "guest_drop", keys.drop, (tid, "untake", version))).decode()) == Drop.DROPPED
            # (untake finds "|d" when a mover of another shard list dropped it just now)
            if dropped:
                if not await self._adopt(here, here, tid, version, due, keys, usable):
                    return Outcome.BUSY
            elif not await self._undo(here, here, tid, version, keys, usable):
                return Outcome.BUSY
            await here.script("guest_drop", keys.drop, (tid, "forget", version))
        await here.call("SREM", self.store.keys.guests, tid)
        return Outcome.OWNED
