"""The checker's second duty: guests. Jobs written to a shard while their owner was down
go back to the owner once it answers (`sweep_guests`, dq/storage/guests.py); a retired
shard's jobs are made guests until it holds none (`Retirement`); php-delayqueue's jobs are
adopted (`adopt_loop`, dq/storage/adopt.py), and shards given guests by it recorded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from dq.errors import DqError
from dq.registry.core import Registry
from dq.roles.checker.health import Checker
from dq.runtime.context import Context
from dq.runtime.loops import pause
from dq.sharding.plan import EMBEDDED, drained_path, drained_record
from dq.sharding.shards import Shard
from dq.storage.adopt import ADOPT_EVERY, Adopter
from dq.storage.guests import GuestMover
from dq.storage.store import Store

log = logging.getLogger("dq.checker")


async def sweep_guests(checker: Checker, mover: GuestMover, budget: float) -> None:
    """Move guests (jobs written to a shard while their owner was down) home to owners
    that answer again, for at most about `budget` seconds: a job left where it was
    written would fire twice if it were added again on its owner."""
    deadline = time.monotonic() + budget
    for shard in checker.shards.shards:
        if not checker.answering(shard):
            continue
        # its guests belong to the other shards: no use looking while none answers
        homes = any(checker.answering(s) for s in checker.shards.shards if s is not shard)
        try:
            if homes and time.monotonic() < deadline:
                counts = await mover.sweep(shard, checker.answering, deadline=deadline)
            else:
                counts = await mover.put_back_stranded(shard, checker.answering)
        except DqError as exc:
            log.debug("%s: cannot sweep guests on %s: %s", checker.ctx.name, shard.label, exc)
            continue
        homed = counts["moved"] + counts["superseded"]
        if homed or counts["error"]:
            name = checker.states[shard.name].name
            log.info("%s: moved %d guest jobs home from shard %s (%s)", checker.ctx.name,
                     homed, name, " ".join(f"{k}={n}" for k, n in sorted(counts.items())),
                     extra={"shard": name, "moved": homed})
        checker.guests_moved += homed
        try:
            left = await mover.count(shard)
        except DqError:
            continue
        st = checker.states[shard.name]
        if st.guests != bool(left):
            st.guests = bool(left)
            checker.save()


class Retirement:
    """The retired shards of this generation (the embedded Redis once real shards are
    configured): each round their jobs are recorded as guests, which the sweep moves home;
    once one holds no job at all, it is marked drained (dq/sharding/plan.py) and a later start
    no longer runs it."""

    def __init__(self, ctx: Context, store: Store) -> None:
        self.ctx = ctx
        self.store = store
        self.drained: set[str] = set()

    async def run(self, answering: Callable[[Shard], bool]) -> None:
        for shard in self.store.shards.retired:
            if shard.name in self.drained or not answering(shard):
                continue
            same = await self._same_dataset(shard)
            if same is not None:
                # A new URL for the same Redis (a move onto Sentinel): nothing to move, and
                # moving its jobs "home" onto themselves would never end.
                self._drained(shard, f"is the same Redis as {same.label} (a new URL for "
                              "it): its jobs stay where they are")
                continue
            try:
                added = await self.store.maintenance.retire(shard)
                depth = await self.store.stats.depths(shard)
            except DqError as exc:
                log.debug("%s: cannot retire shard %s: %s", self.ctx.name, shard.label, exc)
                continue
            if added:
                log.info("%s: %d job(s) on the retired shard %s go to the configured shards",
                         self.ctx.name, added, shard.label)
            if depth["jobs"] or depth["dead"]:
                continue
            try:  # php-delayqueue's jobs not adopted yet (adopt_loop) are jobs too
                if await self.store.original.pending(shard):
                    continue
            except DqError:
                continue
            self._drained(shard, "holds no job any more")

    async def _same_dataset(self, shard: Shard) -> Shard | None:
        """The shard that stays whose Redis dataset this retired one is (the same dataset
        token, `Stats.stat_epoch`, kept in the data and replicated with it), if any."""
        try:
            token = await self.store.stats.stat_epoch(shard)
            for other in self.store.shards.writers:
                if await self.store.stats.stat_epoch(other) == token:
                    return other
        except DqError:
            pass
        return None

    def _drained(self, shard: Shard, why: str) -> None:
        self.drained.add(shard.name)
        with contextlib.suppress(OSError):
            if shard.name == EMBEDDED:
                drained_path(self.ctx.settings).write_text(
                    "no job left here once real shards were configured\n")
            else:
                with drained_record(self.ctx.settings).open("a", encoding="utf-8") as f:
                    f.write(shard.url + "\n")
        log.info("%s: the retired shard %s %s; a restart leaves it out", self.ctx.name,
                 shard.label, why)


async def adopt_loop(ctx: Context, checker: Checker, adopter: Adopter, mover: GuestMover,
                     registry: Registry | None, every: float = ADOPT_EVERY) -> None:
    """Adopt the jobs php-delayqueue left (dq/storage/adopt.py): a pass at start, then one every
    `every` seconds (one EXISTS per shard when there is nothing). Shards given guests by
    it are recorded as holding guests at once, so that adds on the owners evict them."""
    while not ctx.stopping.is_set():
        try:
            topics = {} if registry is None else await asyncio.to_thread(registry.topics)
            done = await adopter.adopt_all({k: t.priority for k, t in topics.items()})
            checker.adopted += sum(c["adopted"] for c in done.values())
            for shard in checker.shards.shards:
                counts = done.get(shard.label)
                st = checker.states[shard.name]
                if counts and counts["adopted"] and not st.guests \
                        and await mover.count(shard):
                    st.guests = True
                    checker.save()
        except Exception as exc:  # never fatal to the checker: tried again later
            log.warning("%s: adopting php-delayqueue's jobs failed (%s: %s); trying again "
                        "in %.0f s", ctx.name, exc.__class__.__name__, exc, every)
        await pause(ctx.stopping, every)
