"""AsyncDqClient.add_many's sliding window and bulk reply parsing, and the add frames it
builds: against real dq servers on real redis-servers, and against scripted fake servers
for the reply stream's awkward shapes."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from dq.client import (
    AsyncDqClient,
    DqClient,
    _add_frame_of,
    _add_frame_plain,
    _add_frames,
    _Many,
    add_frame,
)
from dq.client.frames import json_text
from dq.errors import DqError
from dq.wire.frames import OK_EMPTY, error_reply
from tests.support.redisproc import RedisProcess
from tests.support.server import Running, start_server

# -- frames ----------------------------------------------------------------------------------

FRAME_CASES: list[dict[str, Any]] = [
    {"topic": "order", "id": "42", "body": {"a": 1}},
    {"topic": "order", "id": 42, "body": None},
    {"topic": "order", "id": True, "body": {}},
    {"topic": "o/r", "id": "a/b\u00e9\U0001f600", "body": {
        "url": "http://x/y", "f": 1.5, "n": None, "l": [1, "x", {"z": False}], 3: "k"}},
    {"topic": "order", "id": "x", "body": OrderedDict(b=1, a=2), "delay": 1.5},
    {"topic": "order", "id": "x", "body": MappingProxyType({"k": "v"}), "delay": 30,
     "fix_time": "2030-01-01 00:00:00"},
    {"topic": "order", "id": "x", "body": [("k", "v")], "due_ms": 1893456000000},
    {"topic": "order", "id": "x", "body": [], "delay": float("nan")},
    {"topic": "order", "id": "x", "body": {"big": 10**30, "neg": -0.0, "inf": float("inf")},
     "delay": True, "due_ms": 1.0},
    {"topic": None, "id": None, "body": {"s": "\x00\x1f\"\\/"}, "fix_time": 5},
    {"topic": 1, "id": 1.25, "body": 0},
    {"topic": True, "id": 1.25, "body": ""},  # True == 1: must not reuse topic 1's prefix
    {"topic": "order", "id": "x", "body": {"\ud800": "lone surrogate"}},
]


def random_json_value(rng: random.Random, depth: int = 0) -> Any:
    """A value json.dumps takes: the kinds the client's fast path (orjson) and its
    fallbacks (json) each write, in the corners where they differ: floats from 1e-12 to
    1e300 and their negatives, integers past 64 bits, control characters, "/", lone
    surrogates, astral characters, keys that are not strings, deep nesting."""
    kind = rng.randrange(12 if depth < 6 else 8)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 2**63 - 1, -2**63, 2**64, -2**70, rng.getrandbits(90)])
    if kind == 2:
        return rng.choice([1.0, -0.0, 0.0]) * 10.0 ** rng.randint(-12, 300) * rng.random()
    if kind == 3:
        return rng.choice([float("nan"), float("inf"), -float("inf"), 1e-7, 1e-5, 1e16])
    if kind in (4, 5, 6, 7):
        alphabet = "ab/\\\"\x00\x1f\x7f\u00e9\u2028\U0001f600\ud800\udfff "
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
    if kind in (8, 9):
        return [random_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [rng.choice(["k", "/", "\u00e9", "\ud800", 7, 2.5, True, None])
            for _ in range(rng.randrange(4))]
    return {k: random_json_value(rng, depth + 1) for k in keys}


def test_json_text_writes_what_json_dumps_writes_for_random_values() -> None:
    """The client's fast JSON (orjson where it writes the same bytes, json elsewhere)
    against json.dumps, on 5,000 random values (a fixed seed: a failure repeats)."""
    rng = random.Random(20261208)
    for _ in range(5000):
        value = random_json_value(rng)
        assert json_text(value) == json.dumps(value, separators=(",", ":")), value


def plain(job: dict[str, Any]) -> bytes:
    return _add_frame_plain(job["topic"], job["id"], job.get("body"), delay=job.get("delay"),
                            fix_time=job.get("fix_time"), due_ms=job.get("due_ms"))


def test_fast_frames_are_byte_identical_to_plain_encoding() -> None:
    assert _add_frames(FRAME_CASES) == [plain(j) for j in FRAME_CASES]
    for job in FRAME_CASES:
        assert add_frame(job["topic"], job["id"], job.get("body"), delay=job.get("delay"),
                         fix_time=job.get("fix_time"), due_ms=job.get("due_ms")) == plain(job)
    # add_many parts: the same JSON without the length and "cmd", and back again
    parts = _add_frames(FRAME_CASES, parts=True)
    assert parts == [b"{" + plain(j)[4 + len('{"cmd":"add",'):] for j in FRAME_CASES]
    assert [_add_frame_of(p) for p in parts] == [plain(j) for j in FRAME_CASES]
    # the PHP client's framing, "/" escaped as PHP's json_encode does
    assert add_frame("order", "5f/1", {"u": "a/b"}, delay=30) == (
        b'0073{"cmd":"add","topic":"order","id":"5f\\/1","body":{"u":"a\\/b"},"delay":30}')


def test_fast_frames_raise_what_the_plain_encoding_raises() -> None:
    with pytest.raises(DqError) as info:
        _add_frames([{"topic": "order", "id": "x", "body": {"pad": "y" * 10_000}}])
    assert info.value.err == "too_large"
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        _add_frames([{"topic": "order", "id": "x", "body": {"s": {1, 2}}}])
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular reference"):
        _add_frames([{"topic": "order", "id": "x", "body": loop}])
    with pytest.raises(DqError, match=r"body must be a dict .* not a str") as info:
        _add_frames([{"topic": "order", "id": "x", "body": '{"a": 1}'}])
    assert info.value.err == "bad_request"
    # a job after one that failed to encode is still framed right
    jobs = [{"topic": "order", "id": "a", "body": {"x": float("nan")}}, FRAME_CASES[3]]
    assert _add_frames(jobs) == [plain(j) for j in jobs]


# -- against real servers ----------------------------------------------------------------------

@pytest.fixture
async def two(tmp_path: Path, redis_server: RedisProcess) -> AsyncIterator[list[Running]]:
    """Two dq servers on one redis-server."""
    started = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        started.append(await start_server(tmp_path / name, [redis_server.url]))
    yield [running for running, _, _ in started]
    for running, ctx, task in started:
        ctx.stopping.set()
        await asyncio.wait_for(task, 10)
        await running.store.shards.close()
        running.registry.close()


async def stored(running: Running) -> int:
    shard = running.store.shards.shards[0]
    return int(await shard.client.hlen(running.store.keys.jobs))


def jobs_of(n: int, prefix: str = "j") -> list[dict[str, Any]]:
    return [{"topic": "order", "id": f"{prefix}{i}", "body": {"i": i}, "delay": 600}
            for i in range(n)]


@pytest.mark.parametrize("window", [4000, 97])
async def test_add_many_stores_every_job_and_errors_land_in_place(
        two: list[Running], window: int) -> None:
    client = AsyncDqClient([two[0].addr])
    jobs = jobs_of(5000)
    jobs[1234] = {"topic": "nope", "id": "x"}
    jobs[4000] = {"topic": "order", "id": ""}
    jobs[4999] = {"topic": "off", "id": "y"}
    res = await client.add_many(jobs, window=window)
    assert len(res) == 5000
    assert isinstance(res[1234], DqError) and res[1234].err == "unknown_topic"
    assert isinstance(res[4000], DqError) and res[4000].err == "bad_request"
    assert isinstance(res[4999], DqError) and res[4999].err == "topic_offline"
    assert [i for i, r in enumerate(res) if r is not None] == [1234, 4000, 4999]
    assert await stored(two[0]) == 4997
    # the connection is in step afterwards: each answer belongs to its own request
    for i in (0, 1233, 1235, 3999, 4998):
        body = await client.get("order", f"j{i}")
        assert body is not None and body["i"] == i
    assert await client.add_many([]) == []
    await client.close()


async def test_add_many_over_several_connections(two: list[Running]) -> None:
    """connections=3: three connections to the server, results in job order with errors
    in place, and the adds of one topic:id in order (on one connection)."""
    client = AsyncDqClient([two[0].addr])
    jobs = jobs_of(3000)
    jobs[7] = {"topic": "nope", "id": "x"}
    jobs[8] = {"topic": "order"}  # no id: refused alone, as on one connection
    # the same job three times, last body wins as it would on one connection
    jobs += [{"topic": "order", "id": "again", "body": {"i": n}, "delay": 600}
             for n in range(3)]
    res = await client.add_many(jobs, connections=3, window=50)
    assert len(res) == len(jobs)
    assert isinstance(res[7], DqError) and res[7].err == "unknown_topic"
    assert isinstance(res[8], DqError) and res[8].err == "bad_request"
    assert [i for i, r in enumerate(res) if r is not None] == [7, 8]
    assert len(two[0].server.connections) == 3
    body = await client.get("order", "again")
    assert body is not None and body["i"] == 2
    assert await stored(two[0]) == 3000 - 2 + 1
    # the extra connections are kept for the next call, and closed with the client
    await client.add_many(jobs_of(10, "k"), connections=3)
    assert len(two[0].server.connections) == 3
    await client.close()
    for _ in range(100):
        if not two[0].server.connections:
            break
        await asyncio.sleep(0.01)
    assert not two[0].server.connections


async def test_add_many_fails_over_when_its_server_dies_mid_stream(
        two: list[Running]) -> None:
    client = AsyncDqClient([two[0].addr, two[1].addr], timeout=5)
    jobs = jobs_of(20_000)
    adding = asyncio.create_task(client.add_many(jobs, window=2000))
    while await stored(two[0]) < 1000:  # both servers write to the one redis
        assert not adding.done()
        await asyncio.sleep(0.005)
    victim = next(r for r in two if r.server.connections)
    for conn in list(victim.server.connections):  # a kill: the replies in flight are lost
        assert conn.transport is not None
        conn.transport.abort()
    res = await asyncio.wait_for(adding, 60)
    assert res == [None] * len(jobs)
    assert await stored(two[0]) == len(jobs)
    assert client._server is not None and client._server[1] != victim.port
    await client.close()


async def test_add_many_cancelled_leaves_no_stale_replies(two: list[Running]) -> None:
    client = AsyncDqClient([two[0].addr])
    adding = asyncio.create_task(client.add_many(jobs_of(50_000)))
    while await stored(two[0]) < 100:
        await asyncio.sleep(0.002)
    adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    assert await stored(two[0]) < 50_000  # it was cancelled mid-stream
    assert client._conn is None  # the connection owing replies was dropped
    # the replies still owed went with the connection, not into the next request
    body = await client.get("order", "j0")
    assert body is not None and body["i"] == 0
    await client.add("order", "after", {"k": "v"}, delay=60)
    after = await client.get("order", "after")
    assert after is not None and after["k"] == "v"
    await client.close()


# -- against scripted fake servers -------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_frames(reader: asyncio.StreamReader, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        size = int(await reader.readexactly(4))
        out.append(json.loads(await reader.readexactly(size)))
    return out


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


async def test_replies_split_anywhere_and_odd_successes_parse(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    other_ok = b'0033{"code":1,"msg":"succ","data":{}}'
    odd_text = b'{"data":[], "msg":"succ", "code":1 }'  # a success, not the constant frame
    odd = b"%04d" % len(odd_text) + odd_text

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = 0
        while i < 300:  # the client keeps at least 48 of its window of 64 in flight
            replies = []
            for req in await read_frames(reader, 16 if i < 288 else 12):
                if req["topic"] == "bad":
                    replies.append(error_reply(("bad_request", f"no {i}")))
                else:
                    replies.append((OK_EMPTY, other_ok, odd, OK_EMPTY)[i % 4])
                i += 1
            data = b"".join(replies)
            for k in range(0, len(data), 5):  # dribble: pieces split headers and bodies
                writer.write(data[k:k + 5])
                await writer.drain()
                await asyncio.sleep(0)

    client = AsyncDqClient([await fake(script)], many_frames=False)
    jobs = jobs_of(300)
    for i in (0, 77, 299):
        jobs[i] = {"topic": "bad", "id": str(i)}
    res = await client.add_many(jobs, window=64)
    for i, r in enumerate(res):
        if i in (0, 77, 299):
            assert isinstance(r, DqError) and r.err == "bad_request" and r.msg == f"no {i}"
        else:
            assert r is None, (i, r)
    await client.close()


async def test_garbled_reply_resends_unanswered_jobs_to_next_server(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    seen: dict[str, list[str]] = {"bad": [], "good": []}

    async def garbler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reqs = await read_frames(reader, 100)
        seen["bad"] += [r["id"] for r in reqs]
        writer.write(OK_EMPTY * 40 + b"x033" + OK_EMPTY[4:] + OK_EMPTY * 59)

    async def good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            [req] = await read_frames(reader, 1)
            seen["good"].append(req["id"])
            writer.write(OK_EMPTY)

    servers = [await fake(garbler), await fake(good)]
    garbled = 0
    for _ in range(30):  # the client tries live servers in random order: see both orders
        seen["bad"].clear()
        seen["good"].clear()
        client = AsyncDqClient(servers, many_frames=False)
        res = await client.add_many(jobs_of(100), window=100)
        assert res == [None] * 100
        if seen["bad"]:  # the garbling server was tried first: the 40 it answered stay done
            garbled += 1
            assert seen["good"] == [f"j{i}" for i in range(40, 100)]
        else:
            assert seen["good"] == [f"j{i}" for i in range(100)]
        await client.close()
    assert 0 < garbled < 30


async def test_silent_server_times_out_as_unavailable(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    client = AsyncDqClient([await fake(silent)], timeout=0.3, many_frames=False)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(DqError) as info:
        await client.add_many(jobs_of(10_000))
    assert info.value.err == "unavailable"
    assert loop.time() - t0 < 2  # the stall is noticed, not waited out for 10 s of budget
    await client.close()


# -- add_many frames ---------------------------------------------------------------------------

def test_many_frames_pack_jobs_up_to_the_count_and_size_limits() -> None:
    jobs = jobs_of(450)
    jobs[10] = {"topic": "order", "id": "big", "body": {"s": "x" * 9940}}  # fits only alone
    jobs[20] = {"topic": "order", "id": "half", "body": {"s": "y" * 6000}}
    frames = _Many(True).frames(jobs, 1000, {})
    singles = _add_frames(jobs)
    parts = _add_frames(jobs, parts=True)
    assert frames[0].start == 1000 and frames[-1].stop == 1450
    assert all(a.stop == b.start for a, b in itertools.pairwise(frames))
    assert [(f.start, f.many) for f in frames if not f.many] == [(1010, False)]
    assert frames[1].data == singles[10]  # "big" goes as the add frame add() would send
    for f in frames:
        assert len(f.data) - 4 == int(f.data[:4]) <= 9999
        if not f.many:
            continue
        req = json.loads(f.data[4:])
        assert list(req) == ["cmd", "jobs"] and req["cmd"] == "add_many"
        # each job is its add frame's JSON without "cmd"
        assert req["jobs"] == [{k: v for k, v in json.loads(singles[i - 1000][4:]).items()
                                if k != "cmd"} for i in range(f.start, f.stop)]
        assert f.stop - f.start <= 200
        if f.stop < 1450 and f.stop != 1010:  # full: the next job would not have fitted
            # (the JSON, and a comma and the next job's part)
            assert f.stop - f.start == 200 or (
                len(f.data) - 4 + 1 + len(parts[f.stop - 1000]) > 9999)
    small = _Many(True).frames([{"topic": "o", "id": i} for i in range(450)], 0, {})  # 200 fit
    assert [(f.start, f.stop) for f in small] == [(0, 200), (200, 400), (400, 450)]


async def test_add_many_falls_back_to_add_frames_when_add_many_is_refused(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    """dq 0.2 answers an add_many frame "cmd must be one of add, get, del, ping": the jobs
    go again as add frames, and the client sends no more add_many frames after that."""
    cmds: list[str] = []

    async def old_dq(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            [req] = await read_frames(reader, 1)
            cmds.append(req["cmd"])
            if req["cmd"] == "add":
                ok = req["topic"] == "order"
                writer.write(OK_EMPTY if ok else error_reply(("unknown_topic", "no topic")))
            else:
                writer.write(error_reply(("bad_request", "cmd must be one of add, get, del, "
                                                         "ping (got 'add_many')")))

    client = AsyncDqClient([await fake(old_dq)])
    jobs = jobs_of(450)
    jobs[5] = {"topic": "nope", "id": "x"}
    res = await client.add_many(jobs)
    assert [i for i, r in enumerate(res) if r is not None] == [5]
    assert isinstance(res[5], DqError) and res[5].err == "unknown_topic"
    assert cmds.count("add") == 450 and 1 <= cmds.count("add_many") <= 3
    cmds.clear()
    assert await client.add_many(jobs_of(300)) == [None] * 300
    assert cmds == ["add"] * 300
    await client.close()


async def test_many_frames_false_sends_add_frames_only(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    """php-delayqueue's server does not answer a command it does not know: its clients
    are made with many_frames=False and send add frames only."""
    cmds: list[str] = []

    async def php(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            [req] = await read_frames(reader, 1)
            cmds.append(req["cmd"])
            if req["cmd"] == "add":
                writer.write(b'0033{"code":1,"msg":"succ","data":[]}')

    client = AsyncDqClient([await fake(php)], many_frames=False, timeout=1)
    assert await client.add_many(jobs_of(250)) == [None] * 250
    assert cmds == ["add"] * 250
    await client.close()


async def test_add_many_frames_against_real_servers_store_in_job_order(
        two: list[Running]) -> None:
    """The same id twice in one add_many frame and across frames: the last add wins."""
    client = AsyncDqClient([two[0].addr])
    jobs = jobs_of(500)
    for n, at in enumerate((3, 150, 199, 200, 499)):
        jobs[at] = {"topic": "order", "id": "same", "body": {"n": n}, "delay": 60}
    assert await client.add_many(jobs) == [None] * 500
    body = await client.get("order", "same")
    assert body is not None and body["n"] == 4
    assert await stored(two[0]) == 500 - 5 + 1
    assert two[0].server.handler.stats["add"] == 500
    await client.close()


async def test_a_job_that_is_not_json_fails_alone_and_batching_goes_on(
        two: list[Running]) -> None:
    """A NaN makes its add_many frame invalid JSON: that frame's jobs are sent again one by
    one, so only the bad job fails, and the next add_many still sends add_many frames."""
    client = AsyncDqClient([two[0].addr])
    jobs = jobs_of(300)
    jobs[250] = {"topic": "order", "id": "nan", "body": {"f": float("nan")}}
    res = await client.add_many(jobs)
    assert [i for i, r in enumerate(res) if r is not None] == [250]
    assert isinstance(res[250], DqError) and res[250].err == "bad_request"
    assert await stored(two[0]) == 299
    assert client._many.use()  # the next add_many sends add_many frames again
    await client.close()


async def test_a_job_that_cannot_be_encoded_fails_alone(two: list[Running]) -> None:
    """Frames are made as the window moves on: a job that cannot be encoded (a circular
    body, a set) gets its own bad_request, before or after the first frames were sent, on
    a new or a kept connection, and every other job is stored."""
    loop: dict[str, Any] = {}
    loop["self"] = loop
    client = AsyncDqClient([two[0].addr])
    for rnd in range(2):  # the second time on the kept connection
        jobs = jobs_of(3000, f"r{rnd}-")
        jobs[5] = {"topic": "order", "id": "loop", "body": loop}
        jobs[2500] = {"topic": "order", "id": "set", "body": {"s": {1, 2}}}
        jobs[2999] = {"topic": "order"}  # no id
        res = await client.add_many(jobs)
        assert [i for i, r in enumerate(res) if r is not None] == [5, 2500, 2999]
        assert all(isinstance(res[i], DqError) and res[i].err == "bad_request"
                   for i in (5, 2500, 2999))
        assert "Circular reference" in res[5].msg and "set" in res[2500].msg
        assert await stored(two[0]) == 2997 * (rnd + 1)
    sync = DqClient([two[0].addr])
    res = await asyncio.to_thread(sync.add_many, [{"topic": "order", "id": "a", "body": loop},
                                                  {"topic": "order", "id": "b"}])
    assert isinstance(res[0], DqError) and res[0].err == "bad_request" and res[1] is None
    sync.close()
    await client.close()


async def test_a_slow_but_steady_server_is_not_given_up(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    """A reply comes every 20 ms, each answering 200 adds (10,000 adds/s): 40,000 adds take
    4 s, far beyond timeout + 1 ms per frame, but within 1 ms per add."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            [req] = await read_frames(reader, 1)
            await asyncio.sleep(0.02)
            text = json.dumps({"code": 1, "msg": "succ", "data": [1] * len(req["jobs"])})
            writer.write(b"%04d" % len(text) + text.encode())

    client = AsyncDqClient([await fake(slow)], timeout=0.5)
    jobs = [{"topic": "o", "id": i} for i in range(40_000)]  # 200 to a frame
    assert await client.add_many(jobs, window=1000) == [None] * 40_000
    await client.close()


async def test_a_frame_failing_whole_keeps_the_last_add_of_a_job_last(
        two: list[Running]) -> None:
    """x is added in a frame that fails whole (a NaN in another job), then again in a
    later frame: the failed frame's jobs are sent again after the later frames, and x's
    later add with them, so x keeps its last body."""
    client = AsyncDqClient([two[0].addr])
    jobs = jobs_of(1000)
    jobs[10] = {"topic": "order", "id": "x", "body": {"v": 1}, "delay": 60}
    jobs[11] = {"topic": "order", "id": "nan", "body": {"f": float("nan")}}
    jobs[900] = {"topic": "order", "id": "x", "body": {"v": 2}, "delay": 60}
    res = await client.add_many(jobs)
    assert [i for i, r in enumerate(res) if r is not None] == [11]
    body = await client.get("order", "x")
    assert body is not None and body["v"] == 2
    await client.close()


async def test_a_repeated_job_error_reaches_every_job_in_full(two: list[Running]) -> None:
    client = AsyncDqClient([two[0].addr])
    res = await client.add_many([{"topic": "nope", "id": str(i), "body": {"p": "x" * 30}}
                                 for i in range(600)])
    assert all(isinstance(r, DqError) and r.err == "unknown_topic" for r in res)
    assert {r.msg for r in res} == {"topic 'nope' is not registered; register it in the "
                                    "console (or the dq_topic table) before adding jobs to it"}
    await client.close()


async def test_a_server_with_a_small_max_frame_gets_smaller_frames(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    running, ctx, task = await start_server(tmp_path, [redis_server.url], max_frame=3000)
    client = AsyncDqClient([running.addr])
    assert await client.add_many(jobs_of(2000)) == [None] * 2000  # too_large, then one by one
    assert client._many.limit < 9999
    while client._many.limit > 3000:  # each call that meets a too_large frame halves it
        assert await client.add_many(jobs_of(500, "again")) == [None] * 500
    fails = running.server.handler.stats["fail"]
    assert await client.add_many(jobs_of(2000, "fit")) == [None] * 2000
    assert running.server.handler.stats["fail"] == fails  # no frame refused any more
    await client.close()
    ctx.stopping.set()
    await task
    await running.store.shards.close()
    running.registry.close()


async def test_add_many_frames_are_tried_again_after_a_refusal(
        fake: Callable[[Script], Awaitable[str]]) -> None:
    cmds: list[str] = []

    async def old_dq(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            [req] = await read_frames(reader, 1)
            cmds.append(req["cmd"])
            writer.write(OK_EMPTY if req["cmd"] == "add" else error_reply((
                "bad_request", "cmd must be one of add, get, del, ping (got 'add_many')")))

    client = AsyncDqClient([await fake(old_dq)])
    assert await client.add_many(jobs_of(10)) == [None] * 10
    assert cmds == ["add_many", *["add"] * 10]
    cmds.clear()
    client._many.off_until = 0.0  # MANY_RETRY seconds later: the server may be upgraded
    assert await client.add_many(jobs_of(10)) == [None] * 10
    assert cmds == ["add_many", *["add"] * 10]
    await client.close()
