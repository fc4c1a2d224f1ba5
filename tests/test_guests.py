"""Guests: jobs written to another shard while their owner was down, moved home when it is
back (dq/storage/lua/guest_*.lua, dq/storage/guests.py, sweep_guests), against real redis-servers.

Without the move, a job added during an outage and added again after it would exist on
two shards and fire twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from dq.errors import UNAVAILABLE, DqError
from dq.sharding.shards import Shard, ShardSet
from dq.storage.guests import GuestMover
from dq.storage.store import Store
from tests.support.redisproc import RedisProcess
from tests.support.waits import until


@dataclass
class Pair:
    store: Store
    owner: RedisProcess  # the owner of every job id in `ids`
    other: RedisProcess
    ids: list[str]
    mover: GuestMover

    def shard(self, proc: RedisProcess) -> Shard:
        return next(s for s in self.store.shards.shards if s.url == proc.url)

    async def down(self) -> None:
        await asyncio.to_thread(self.owner.stop)

    async def up(self) -> None:
        await asyncio.to_thread(self.owner.start)
        self.shard(self.owner)._recovered()  # close its breaker (the cool-off would)

    async def holds(self, proc: RedisProcess, job_id: str) -> bytes | None:
        res = await self.shard(proc).call("HGET", self.store.keys.jobs, f"t:{job_id}")
        return res if res is None else bytes(res)

    async def guests(self, proc: RedisProcess) -> set[str]:
        return {m.decode() for m in await self.shard(proc).call("SMEMBERS",
                                                                self.store.keys.guests)}

    async def sweep(self) -> dict[str, int]:
        return dict(await self.mover.sweep(self.shard(self.other), everyone))

    async def deliver_all(self) -> list[tuple[str, object]]:
        return await deliver_all(self.store)


async def deliver_all(store: Store) -> list[tuple[str, object]]:
    """Move due jobs and claim them on every shard: (id, body) of every delivery."""
    out = []
    for shard in store.shards.shards:
        await store.move_due(shard, range(store.buckets))
        for c in await store.claim(shard, 100, [1, 2, 3], 30_000):
            out.append((c.id, c.body["gen"]))
            await store.ack(c)
    return sorted(out)


def everyone(_: Shard) -> bool:
    return True


@pytest.fixture
async def pair(redis_factory: Callable[[], RedisProcess]) -> AsyncIterator[Pair]:
    r1, r2 = redis_factory(), redis_factory()
    store = Store(ShardSet.from_urls([r1.url, r2.url]), buckets=4)
    ids = [f"j{i}" for i in range(200) if store.shards.owner(f"t:j{i}").url == r2.url][:20]
    yield Pair(store, r2, r1, ids, GuestMover(store))
    await store.shards.close()


async def test_job_added_during_outage_and_again_after_fires_once(pair: Pair) -> None:
    """The bug: the copy written to the other shard during the outage survived the re-add
    on the owner, and both fired."""
    job = pair.ids[0]
    await pair.down()
    res = await pair.store.add("t", job, {"gen": 1}, delay_ms=0)
    assert res.shard == pair.other.url
    assert await pair.guests(pair.other) == {f"t:{job}"}
    # as the console and the metrics show it
    assert (await pair.store.stats.depths(pair.shard(pair.other)))["guests"] == 1
    await pair.up()
    # re-added by another server process, which wrote no guest and has not yet read
    # the checker's record: no eviction, the sweep sorts it out
    pair.shard(pair.other).guests_until = 0
    res = await pair.store.add("t", job, {"gen": 2}, delay_ms=0)
    assert res.shard == pair.owner.url
    assert await pair.sweep() == {"superseded": 1}  # the owner's copy is newer
    assert await pair.holds(pair.other, job) is None
    assert await pair.guests(pair.other) == set()
    assert await pair.deliver_all() == [(job, 2)]


async def test_guests_move_home_with_payload_and_due(pair: Pair) -> None:
    await pair.down()
    for i, job in enumerate(pair.ids):
        await pair.store.add("t", job, {"gen": i}, delay_ms=60_000 + i)
    before = {job: await pair.holds(pair.other, job) for job in pair.ids}
    dues = {job: await pair.shard(pair.other).call(
        "ZSCORE", pair.store.keys.delay[pair.store.keys.bucket(f"t:{job}")], f"t:{job}")
        for job in pair.ids}
    await pair.up()
    assert await pair.sweep() == {"moved": len(pair.ids)}
    for job in pair.ids:
        assert await pair.holds(pair.other, job) is None
        assert await pair.holds(pair.owner, job) == before[job]  # same version, attempt
        assert await pair.shard(pair.owner).call(
            "ZSCORE", pair.store.keys.delay[pair.store.keys.bucket(f"t:{job}")], f"t:{job}") \
            == dues[job]
    assert await pair.guests(pair.other) == set()
    assert await pair.sweep() == {}  # nothing left to do
    body = await pair.store.get("t", pair.ids[3])
    assert body is not None and body["gen"] == 3


async def test_owner_back_with_an_older_copy_is_replaced_by_the_guest(pair: Pair) -> None:
    job = pair.ids[0]
    await pair.store.add("t", job, {"gen": 1}, delay_ms=0)  # on the owner (appendonly)
    await pair.down()
    await pair.store.add("t", job, {"gen": 2}, delay_ms=0)  # replaced: on the other
    await pair.up()
    assert await pair.holds(pair.owner, job) is not None  # the old copy survived
    assert await pair.sweep() == {"moved": 1}
    assert await pair.deliver_all() == [(job, 2)]


async def due_guest(pair: Pair, job: str) -> Shard:
    """A guest added during an outage, due at once and moved to its shard's ready list."""
    await pair.down()
    await pair.store.add("t", job, {"gen": 1}, delay_ms=0)
    other = pair.shard(pair.other)
    await pair.store.move_due(other, range(pair.store.buckets))
    return other


async def test_guest_being_delivered_stays_until_done(pair: Pair) -> None:
    job = pair.ids[0]
    other = await due_guest(pair, job)
    await pair.up()
    assert await pair.sweep() == {"busy": 1}  # ready: delivered from where it is
    [c] = await pair.store.claim(other, 10, [1, 2, 3], 30_000)
    assert await pair.sweep() == {"busy": 1}  # in flight
    await pair.store.ack(c)
    assert await pair.sweep() == {"gone": 1}
    assert await pair.guests(pair.other) == set()
    assert await pair.deliver_all() == []


async def test_dead_guest_stays_as_a_dead_letter(pair: Pair) -> None:
    job = pair.ids[0]
    other = await due_guest(pair, job)
    [c] = await pair.store.claim(other, 10, [1, 2, 3], 30_000)
    await pair.store.bury(c, {"error": "HTTP 500"})
    await pair.up()
    assert await pair.sweep() == {"stay": 1}
    assert await pair.guests(pair.other) == set()
    assert await pair.holds(pair.other, job) is not None and \
        await pair.holds(pair.owner, job) is None


async def take(pair: Pair, job: str) -> list[bytes]:
    """guest_take alone: a mover that dies right after it."""
    store, tid = pair.store, f"t:{job}"
    res: list[bytes] = await pair.shard(pair.other).script("guest_take", (
        store.keys.jobs, store.keys.delay[store.keys.bucket(tid)], store.keys.dead,
        store.keys.guests,
        store.keys.moving), (tid,))
    return res


async def taken_guests(pair: Pair, *jobs: str) -> None:
    """Guests added during an outage, then taken by a mover that died right after."""
    await pair.down()
    for job in jobs:
        await pair.store.add("t", job, {"gen": 1}, delay_ms=0)
    await pair.up()
    for job in jobs:
        assert (await take(pair, job))[0] == b"take"


async def test_a_move_killed_midway_is_finished_or_undone(pair: Pair) -> None:
    a, b = pair.ids[:2]
    await taken_guests(pair, a, b)
    other = pair.shard(pair.other)
    # taken out of its bucket: no timer there fires it while it moves
    moved, _, _ = await pair.store.move_due(other, range(pair.store.buckets))
    assert moved == 0
    # the owner is down again when the next sweep runs: both go back in their buckets
    await pair.down()
    assert dict(await pair.mover.sweep(other, lambda s: s is other)) == {"untaken": 2}
    # the marks stay, as put back: the owner may hold a copy an earlier land wrote
    assert await pair.mover.sweep(other, lambda s: s is other) == {}
    assert await other.call("HLEN", pair.store.keys.moving) == 2
    await pair.up()
    assert (await take(pair, a))[0] == b"take"
    assert await pair.sweep() == {"moved": 2}  # a resumed, b taken afresh
    assert await other.call("HLEN", pair.store.keys.moving) == 0
    assert await pair.deliver_all() == [(a, 1), (b, 1)]


async def test_job_deleted_or_replaced_during_a_move_is_not_resurrected(pair: Pair) -> None:
    a, b = pair.ids[:2]
    await taken_guests(pair, a, b)
    assert await pair.store.delete("t", a)
    pair.shard(pair.owner).open_until = 1e18  # the owner fails fast: b's re-add is a guest
    assert (await pair.store.add("t", b, {"gen": 2}, delay_ms=0)).shard == pair.other.url
    pair.shard(pair.owner)._recovered()
    assert await pair.sweep() == {"changed": 2}
    assert await pair.sweep() == {"moved": 1}  # b's replacement, a guest itself
    assert await pair.deliver_all() == [(b, 2)]


async def test_concurrent_sweeps_leave_one_copy_each(pair: Pair) -> None:
    await pair.down()
    for job in pair.ids:
        await pair.store.add("t", job, {"gen": 1}, delay_ms=0)
    await pair.up()
    # a second process's store (its own connections) sweeps the same shard at once
    rival = Store(ShardSet.from_urls([pair.other.url, pair.owner.url]), buckets=4)
    try:
        rival_other = next(s for s in rival.shards.shards if s.url == pair.other.url)
        results = await asyncio.gather(pair.sweep(), GuestMover(rival).sweep(rival_other, everyone))
    finally:
        await rival.shards.close()
    total = sum(n for r in results for k, n in dict(r).items() if k == "moved")
    assert total >= len(pair.ids)
    assert all(k in ("moved", "gone", "changed", "superseded") for r in results for k in r)
    assert await pair.deliver_all() == [(job, 1) for job in sorted(pair.ids)]


async def test_copy_landed_before_a_delete_is_undone(pair: Pair) -> None:
    """A mover that landed the job on the owner and died before dropping it, while a client
    deleted the job: the next sweep removes the landed copy instead of letting it fire."""
    job = pair.ids[0]
    store, tid = pair.store, f"t:{job}"
    await pair.down()
    await store.add("t", job, {"gen": 1}, delay_ms=0)
    await pair.up()
    _, payload, due, version = await take(pair, job)
    assert await store.delete("t", job)
    b = store.keys.bucket(tid)
    landed = await pair.shard(pair.owner).script("guest_land", (
        store.keys.jobs, store.keys.delay[b], store.keys.wake[b], store.keys.inflight,
        store.keys.dead,
        store.keys.dead_err), (tid, "land", version.decode(), payload, int(due), 0))
    assert landed == b"landed" and await pair.holds(pair.owner, job) is not None
    assert await pair.sweep() == {"changed": 1}
    assert await pair.holds(pair.owner, job) is None
    assert await pair.guests(pair.other) == set()
    assert await pair.deliver_all() == []


async def test_copy_landed_then_deleted_while_the_owner_is_down_is_undone_later(
        pair: Pair) -> None:
    """The mover died after landing the job on the owner; the owner went down and the job
    was deleted where it was. Sweeps while the owner is down keep the mark (the landed
    copy is out of reach); the first sweep that reaches the owner removes that copy."""
    job = pair.ids[0]
    store, tid = pair.store, f"t:{job}"
    await taken_guests(pair, job)
    other = pair.shard(pair.other)
    b = store.keys.bucket(tid)
    _, payload, due, version = await pair.shard(pair.other).script("guest_take", (
        store.keys.jobs, store.keys.delay[b], store.keys.dead, store.keys.guests,
        store.keys.moving), (tid,))
    await pair.shard(pair.owner).script("guest_land", (
        store.keys.jobs, store.keys.delay[b], store.keys.wake[b], store.keys.inflight,
        store.keys.dead,
        store.keys.dead_err), (tid, "land", version.decode(), payload, int(due), 0))
    await pair.down()
    assert await store.delete("t", job)  # found and deleted where it was
    assert dict(await pair.mover.sweep(other, lambda s: s is other)) == {"changed": 1}
    assert await other.call("HLEN", store.keys.moving) == 1  # kept for the owner's return
    await pair.up()
    assert await pair.holds(pair.owner, job) is not None  # the landed copy, back with it
    assert await pair.sweep() == {"changed": 1}
    assert await pair.holds(pair.owner, job) is None
    assert await other.call("HLEN", store.keys.moving) == 0
    assert await pair.guests(pair.other) == set()
    assert await pair.deliver_all() == []


async def test_add_on_the_owner_evicts_the_older_guest_at_once(pair: Pair) -> None:
    """While a shard is known to hold guests, an add on a job's owner also removes the job's
    older copy there, delayed, ready or in flight: even when the new one is delivered
    before any sweep, the old one can neither fire nor be moved home over it."""
    a, b, c, d = pair.ids[:4]
    other = pair.shard(pair.other)
    await pair.down()
    for job in (a, b, c):
        await pair.store.add("t", job, {"gen": 1}, delay_ms=0)
    await pair.store.move_due(other, range(pair.store.buckets))  # a, b, c ready there
    [claimed] = await pair.store.claim(other, 1, [1, 2, 3], 30_000)  # one in flight
    await pair.store.add("t", d, {"gen": 1}, delay_ms=60_000)  # delayed
    await pair.up()
    other.guests_until = 0
    other.has_guests = True  # as dq/sharding/health.py sets it from the checker's record
    for job in (a, b, c, d):
        await pair.store.add("t", job, {"gen": 2}, delay_ms=0)
    async def evicted() -> bool:  # the evictions went out in the adds' loop turn
        return all([await pair.holds(pair.other, job) is None for job in (a, b, c, d)])

    await until(evicted, 5, "the older copies evicted")
    # the call under way finishes, but the replaced job is neither acked nor retried there
    assert not await pair.store.ack(claimed)
    assert await pair.guests(pair.other) == set()
    assert await pair.deliver_all() == [(job, 2) for job in sorted((a, b, c, d))]


async def test_a_guest_written_here_lately_is_evicted_before_the_record_says_so(
        pair: Pair) -> None:
    """The checker's record lags (a round, and the readers' poll): a process that wrote a
    guest itself evicts on owner adds at once."""
    job = pair.ids[0]
    pair.shard(pair.owner).open_until = 1e18  # a blip: this process's breaker opens
    assert (await pair.store.add("t", job, {"gen": 1}, delay_ms=0)).shard == pair.other.url
    pair.shard(pair.owner)._recovered()
    assert not pair.shard(pair.other).has_guests  # the record never said so
    await pair.store.add("t", job, {"gen": 2}, delay_ms=0)

    async def evicted() -> bool:
        return await pair.holds(pair.other, job) is None

    await until(evicted, 5, "the guest evicted")
    assert await pair.deliver_all() == [(job, 2)]


async def test_no_eviction_without_guests_or_for_a_guest_add(pair: Pair) -> None:
    job = pair.ids[0]
    other = pair.shard(pair.other)
    await pair.store.add("t", job, {"gen": 1}, delay_ms=0)  # on the owner
    calls_before = dict(pair.store.batch._queued)
    other.has_guests = False
    await pair.store.add("t", job, {"gen": 2}, delay_ms=0)
    assert ("evict", other) not in pair.store.batch._queued and calls_before == {}
    pair.shard(pair.owner).open_until = 1e18  # the owner fails fast: the add is a guest
    other.has_guests = True
    shard, _ = pair.store.add_job("t", job, {"gen": 3}, delay_ms=0)
    assert shard is other and ("evict", other) not in pair.store.batch._queued
    assert other.guests_until > time.time() * 1000  # its later owner adds will evict
    pair.shard(pair.owner)._recovered()
    pair.shard(pair.other).has_guests = False


async def test_landed_copy_fires_only_once_committed(pair: Pair) -> None:
    """The owner's copy is written unscheduled and scheduled only after the guest is gone:
    a mover that dies between the two leaves a copy nothing fires, which the next sweep
    commits."""
    job = pair.ids[0]
    store, tid = pair.store, f"t:{job}"
    await taken_guests(pair, job)
    b = store.keys.bucket(tid)
    owner, other = pair.shard(pair.owner), pair.shard(pair.other)
    _, payload, due, version = await take(pair, job)  # resumes the take
    land_keys = (store.keys.jobs, store.keys.delay[b], store.keys.wake[b], store.keys.inflight,
                 store.keys.dead, store.keys.dead_err)
    drop_keys = (store.keys.jobs, store.keys.delay[b], store.keys.guests, store.keys.moving,
                 store.keys.wake[b])
    assert await owner.script("guest_land", land_keys, (
        tid, "land", version.decode(), payload, int(due), 0)) == b"landed"
    assert await other.script("guest_drop", drop_keys, (tid, "drop", version.decode())) \
        == b"dropped"
    # the mover dies here: the owner holds the job, in no bucket; nothing fires it
    assert await pair.holds(pair.owner, job) is not None
    assert await owner.call("ZSCORE", store.keys.delay[b], tid) is None
    assert await pair.deliver_all() == []
    assert (await store.get("t", job) or {}).get("gen") == 1  # and get still finds it
    assert await pair.sweep() == {"moved": 1}
    assert await owner.call("ZSCORE", store.keys.delay[b], tid) is not None
    assert await other.call("HLEN", store.keys.moving) == 0
    assert await pair.guests(pair.other) == set()
    assert await pair.deliver_all() == [(job, 1)]


async def test_a_lost_land_reply_leaves_one_copy(pair: Pair) -> None:
    """The land ran on the owner but its reply was lost: the take stays marked (not put
    back, which would make two copies), and the next sweep finishes the move."""
    job = pair.ids[0]
    await pair.down()
    await pair.store.add("t", job, {"gen": 1}, delay_ms=0)
    await pair.up()
    owner = pair.shard(pair.owner)
    real = owner.script

    async def lossy(name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        res = await real(name, keys, args)
        if name == "guest_land":
            raise DqError(UNAVAILABLE, "the connection dropped before the reply")
        return res

    owner.script = lossy  # type: ignore[method-assign]
    assert await pair.sweep() == {"unsure": 1}
    owner.script = real  # type: ignore[method-assign]
    assert await pair.deliver_all() == []  # neither copy is scheduled meanwhile
    assert await pair.sweep() == {"moved": 1}
    assert await pair.deliver_all() == [(job, 1)]


# The shard list changes while a move is unfinished ------------------------------------

def named_store(*shards: tuple[str, RedisProcess]) -> Store:
    return Store(ShardSet.from_urls([(name, r.url) for name, r in shards]), buckets=4)


def named(store: Store, name: str) -> Shard:
    return next(s for s in store.shards.shards if s.name == name)


def job_owned(old: Store, new: Store, old_owner: str, new_owner: str) -> str:
    """A job id owned by `old_owner` under the old shard list and `new_owner` under the new."""
    return next(j for j in (f"j{i}" for i in range(2000))
                if old.shards.owner(f"t:{j}").name == old_owner
                and new.shards.owner(f"t:{j}").name == new_owner)


async def guest_taken_and_landed(store: Store, here: Shard, owner: Shard, job: str, *,
                                 drop: bool) -> None:
    """A guest on `here`, added while its owner failed, whose mover took it and landed it on
    the owner (and dropped it here, with `drop`), then died."""
    tid, b = f"t:{job}", store.keys.bucket(f"t:{job}")
    owner.open_until = 1e18  # the owner fails fast: the add goes to `here`, a guest
    assert (await store.add("t", job, {"gen": 1}, delay_ms=0)).shard == here.name
    owner._recovered()
    status, payload, due, version = await here.script("guest_take", (
        store.keys.jobs, store.keys.delay[b], store.keys.dead, store.keys.guests,
        store.keys.moving), (tid,))
    assert status == b"take"
    assert await owner.script("guest_land", (
        store.keys.jobs, store.keys.delay[b], store.keys.wake[b], store.keys.inflight,
        store.keys.dead,
        store.keys.dead_err), (tid, "land", version.decode(), payload, int(due), 0)) == b"landed"
    if drop:
        assert await here.script("guest_drop", (
            store.keys.jobs, store.keys.delay[b], store.keys.guests, store.keys.moving,
            store.keys.wake[b]),
            (tid, "drop", version.decode())) == b"dropped"


async def holds(store: Store, shard: Shard, job: str) -> tuple[bool, bool, bool]:
    """Whether `shard` holds the job, has it scheduled, and has it in its guests set."""
    tid = f"t:{job}"
    return (await shard.call("HEXISTS", store.keys.jobs, tid) == 1,
            await shard.call("ZSCORE", store.keys.delay[store.keys.bucket(tid)], tid) is not None,
            await shard.call("SISMEMBER", store.keys.guests, tid) == 1)


Stores = Callable[..., Store]


@pytest.fixture
async def stores(redis_factory: Callable[[], RedisProcess]) -> AsyncIterator[Stores]:
    """Stores over three redis-servers r1, r2, r3, each with its own shard list (name, i):
    what processes see before and after the shard list changed."""
    procs = [redis_factory() for _ in range(3)]
    made: list[Store] = []

    def make(*shards: tuple[str, int]) -> Store:
        store = named_store(*((name, procs[i]) for name, i in shards))
        made.append(store)
        return store

    yield make
    for store in made:
        await store.shards.close()


async def test_a_dropped_move_is_finished_from_where_it_landed_after_the_list_changed(
        stores: Stores) -> None:
    """The mover died between the drop and the commit, and a shard was added before the
    next sweep: the job's owner is now the new shard, which has no copy. The copy landed on
    the owner of then is moved from there to the new owner (it must not stay in no
    bucket, never to fire)."""
    old = stores(("a", 0), ("b", 1))
    new = stores(("a", 0), ("b", 1), ("c", 2))
    job = job_owned(old, new, "b", "c")
    await guest_taken_and_landed(old, named(old, "a"), named(old, "b"), job, drop=True)
    mover = GuestMover(new)
    a, b, c = named(new, "a"), named(new, "b"), named(new, "c")
    # "b" may hold the copy and does not answer: the mark stays for a later sweep
    assert dict(await mover.sweep(a, lambda s: s is not b)) == {"busy": 1}
    assert await a.call("HLEN", new.keys.moving) == 1
    assert dict(await mover.sweep(a, everyone)) == {"moved": 1}
    assert await a.call("HLEN", new.keys.moving) == 0
    assert await holds(new, b, job) == (False, False, False)
    assert await holds(new, c, job) == (True, True, False)
    assert await deliver_all(new) == [(job, 1)]


async def test_a_dropped_move_whose_shard_became_the_owner_is_brought_back(
        stores: Stores) -> None:
    """As above, but the new list makes the guest's own shard the owner (the landing
    shard was renamed): its copy was dropped, so the landed one is moved back."""
    old = stores(("a", 0), ("b", 1))
    new = stores(("a", 0), ("b2", 1))
    job = job_owned(old, new, "b", "a")
    await guest_taken_and_landed(old, named(old, "a"), named(old, "b"), job, drop=True)
    mover = GuestMover(new)
    a, b2 = named(new, "a"), named(new, "b2")
    assert dict(await mover.sweep(a, everyone)) == {"owned": 1}
    assert await holds(new, a, job) == (True, True, False)
    assert await holds(new, b2, job) == (False, False, False)
    assert await deliver_all(new) == [(job, 1)]


async def test_a_landed_copy_of_a_changed_job_is_undone_after_the_list_changed(
        stores: Stores) -> None:
    """The mover died after the land; the guest was then added again (a new version, a guest
    too) and a shard was added. The stale copy on the owner of then is undone, not left
    behind, and the new version alone is delivered."""
    old = stores(("a", 0), ("b", 1))
    new = stores(("a", 0), ("b", 1), ("c", 2))
    job = job_owned(old, new, "b", "c")
    await guest_taken_and_landed(old, named(old, "a"), named(old, "b"), job, drop=False)
    a, b, c = named(new, "a"), named(new, "b"), named(new, "c")
    b.open_until = c.open_until = 1e18
    assert (await new.add("t", job, {"gen": 2}, delay_ms=0)).shard == "a"
    b._recovered()
    c._recovered()
    mover = GuestMover(new)
    # "b" may hold the stale copy and does not answer: the mark stays for a later sweep
    assert dict(await mover.sweep(a, lambda s: s is not b)) == {"busy": 1}
    assert await a.call("HLEN", new.keys.moving) == 1
    assert dict(await mover.sweep(a, everyone)) == {"changed": 1}
    assert await holds(new, b, job) == (False, False, False)
    assert dict(await mover.sweep(a, everyone)) == {"moved": 1}
    assert await deliver_all(new) == [(job, 2)]


async def test_a_later_add_wins_over_a_dropped_moves_copy_after_the_list_changed(
        stores: Stores) -> None:
    """A dropped move's copy sits on the owner of the old list; before the sweep the job is
    added again: on its new owner, or (its new owner failing) as a guest on the shard the
    move began from. The old copy is undone, not moved or scheduled: only the later add
    fires (a helper session's review found both firing)."""
    for renamed in (True, False):
        old = stores(("a", 0), ("b", 1))
        new = stores(("a", 0), ("b2", 1)) if renamed else stores(("a", 0), ("b", 1), ("c", 2))
        job = job_owned(old, new, "b", "a" if renamed else "c")
        await guest_taken_and_landed(old, named(old, "a"), named(old, "b"), job, drop=True)
        a, b = named(new, "a"), named(new, "b2" if renamed else "b")
        if not renamed:
            b.open_until = named(new, "c").open_until = 1e18
        assert (await new.add("t", job, {"gen": 2}, delay_ms=0)).shard == "a"
        for shard in new.shards.shards:
            shard._recovered()
        mover = GuestMover(new)
        assert dict(await mover.sweep(a, everyone)) == ({"owned": 1} if renamed
                                                        else {"moved": 1})
        assert await holds(new, b, job) == (False, False, False)
        assert await deliver_all(new) == [(job, 2)]


async def test_a_new_list_sweep_racing_an_old_list_mover_keeps_the_job(
        stores: Stores) -> None:
    """During a rollout, a mover with the old list (owner b) and one with the new list (b
    renamed b2: the guest's shard a owns the job) work on the same take: the new one reads
    the mark, the old one drops the copy on a, the new one's untake finds the drop. The
    job must end up scheduled once (the review found it lost)."""
    old = stores(("a", 0), ("b", 1))
    new = stores(("a", 0), ("b2", 1))
    job = job_owned(old, new, "b", "a")
    tid = f"t:{job}"
    oa, ob = named(old, "a"), named(old, "b")
    await guest_taken_and_landed(old, oa, ob, job, drop=False)
    old_mover = GuestMover(old)
    keys = old_mover._keys(tid)
    mark = await oa.call("HGET", old.keys.moving, tid)
    version, due = mark.split(b"|")[0].decode(), int(mark.split(b"|")[1])
    na = named(new, "a")
    real = na.call

    async def drop_after_the_mark_is_read(*args: Any) -> Any:
        res = await real(*args)
        if args[:2] == ("HGET", new.keys.moving):
            assert await oa.script("guest_drop", keys.drop, (tid, "drop", version)) \
                == b"dropped"
        return res

    na.call = drop_after_the_mark_is_read  # type: ignore[method-assign]
    assert dict(await GuestMover(new).sweep(na, everyone)) == {"owned": 1}
    na.call = real  # type: ignore[method-assign]
    await old_mover._commit(ob, oa, tid, version, due, keys)  # the old mover goes on
    assert await deliver_all(new) == [(job, 1)]
