"""The TCP server and the Python clients, against real redis-server processes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dq.client import AsyncDqClient, DqClient
from dq.config import Settings, load_settings
from dq.errors import ConfigError, DqError
from dq.registry.topics import TopicCache
from dq.roles.server import Server
from dq.roles.server import connection as dq_connection
from dq.runtime.context import Context
from dq.wire.frames import OK_EMPTY
from tests.support.redisproc import RedisProcess
from tests.support.server import Running, frame, raw_exchange, start_server
from tests.support.waits import until


@pytest.fixture
async def dq(tmp_path: Path, redis_server: RedisProcess) -> AsyncIterator[Running]:
    running, ctx, task = await start_server(tmp_path, [redis_server.url], max_frame=4096)
    yield running
    ctx.stopping.set()
    await asyncio.wait_for(task, 10)
    await running.store.shards.close()
    running.registry.close()


async def test_add_get_del_over_tcp(dq: Running) -> None:
    client = DqClient([dq.addr])
    await asyncio.to_thread(client.add, "order", "42", {"a": 1}, delay=30)
    body = await asyncio.to_thread(client.get, "order", "42")
    assert body is not None and body["a"] == 1
    assert "notify_time" in body and "dq_set_time" in body
    # the job sits on the shard routing picks, due ~30 s from now
    info = await dq.store.lookup("order", "42")
    assert info is not None and info.state == "delayed"
    assert abs(info.due_ms - (time.time() + 30) * 1000) < 2000
    await asyncio.to_thread(client.add, "order", "42", {"a": 2}, delay=5)
    body = await asyncio.to_thread(client.get, "order", "42")
    assert body is not None and body["a"] == 2
    info = await dq.store.lookup("order", "42")
    assert info is not None and abs(info.due_ms - (time.time() + 5) * 1000) < 2000
    assert await asyncio.to_thread(client.delete, "order", "42") is True
    assert await asyncio.to_thread(client.get, "order", "42") is None
    assert await asyncio.to_thread(client.delete, "order", "42") is False
    client.close()


async def test_fix_time_sets_due_and_notify_time(dq: Running) -> None:
    client = AsyncDqClient([dq.addr])
    fix = datetime.fromtimestamp(time.time() + 3600).strftime("%Y-%m-%d %H:%M:%S")
    await client.add("order", "f1", {"x": 1}, fix_time=fix)
    body = await client.get("order", "f1")
    assert body is not None and body["notify_time"] == fix
    info = await dq.store.lookup("order", "f1")
    assert info is not None
    assert info.due_ms == int(datetime.strptime(fix, "%Y-%m-%d %H:%M:%S").timestamp() * 1000)
    await client.close()


async def test_php_client_byte_compatible(dq: Running) -> None:
    """demo.php's add/get/del sequence, as the PHP client frames it."""
    add = {"id": "5f1a", "body": {"a": 1, "b": 2, "c": 3, "ext": "a" * 64}, "cmd": "add",
           "topic": "order"}
    text = json.dumps(add, separators=(",", ":")).encode()

    def php_add() -> bytes:
        with socket.create_connection(("127.0.0.1", dq.port), timeout=3) as s:
            s.sendall(b"%04d" % len(text) + text)
            return s.recv(100)

    assert await asyncio.to_thread(php_add) == b'0033{"code":1,"msg":"succ","data":[]}'
    [reply] = await asyncio.to_thread(
        raw_exchange, dq.port, frame({"cmd": "get", "topic": "order", "id": "5f1a"}))
    assert reply["code"] == 1 and reply["msg"] == "succ" and reply["data"]["ext"] == "a" * 64
    [reply] = await asyncio.to_thread(
        raw_exchange, dq.port, frame({"cmd": "del", "topic": "order", "id": "5f1a"}))
    assert reply == {"code": 1, "msg": "succ", "data": []}


BAD_INPUT = [
    (frame({"cmd": "add", "id": "1", "body": {}}), "bad_request", "topic"),
    (frame({"cmd": "add", "topic": "", "id": "1"}), "bad_request", "topic"),
    (frame({"cmd": "add", "topic": "order", "body": {}}), "bad_request", "id"),
    (frame({"cmd": "add", "topic": "order", "id": ""}), "bad_request", "id"),
    (frame({"cmd": "add", "topic": "order", "id": "1", "body": "str"}), "bad_request", "body"),
    (frame({"cmd": "add", "topic": "order", "id": "1", "fix_time": "tomorrow"}), "bad_request",
     "fix_time"),
    (frame({"cmd": "add", "topic": "order", "id": "1", "fix_time": "2026-02-30 10:00:00"}),
     "bad_request", "fix_time"),
    (frame({"cmd": "frobnicate"}), "bad_request", "cmd"),
    (frame({"cmd": "add", "topic": "nope", "id": "1"}), "unknown_topic", "register"),
    (frame({"cmd": "add", "topic": "off", "id": "1"}), "topic_offline", "offline"),
    (frame([1, 2, 3]), "bad_request", "object"),
    (b"0005{bad}", "bad_request", "JSON"),
    (b"9000" + b"x" * 9000, "too_large", "smaller"),
]


@pytest.mark.parametrize(("data", "err", "word"), BAD_INPUT,
                         ids=[f"{i}-{e}" for i, (_, e, _) in enumerate(BAD_INPUT)])
async def test_bad_input_gets_clear_error_and_stores_nothing(
        dq: Running, data: bytes, err: str, word: str) -> None:
    [reply] = await asyncio.to_thread(raw_exchange, dq.port, data + frame({"cmd": "ping"}), read=1)
    assert reply["code"] == 0 and reply["err"] == err
    assert word.lower() in reply["msg"].lower()
    shard = dq.store.shards.shards[0]
    assert await shard.client.hlen(dq.store.keys.jobs) == 0
    # the same connection and the server keep serving
    [pong] = await asyncio.to_thread(raw_exchange, dq.port, frame({"cmd": "ping"}))
    assert pong["code"] == 1


async def test_garbage_prefix_closes_connection_others_unaffected(dq: Running) -> None:
    replies = await asyncio.to_thread(raw_exchange, dq.port, b"hello world\r\n", read=2)
    assert len(replies) == 1 and replies[0]["err"] == "bad_request"
    assert "4 ASCII digits" in replies[0]["msg"]
    client = AsyncDqClient([dq.addr])
    await client.add("order", "after", {}, delay=60)
    assert await client.get("order", "after") is not None
    await client.close()


async def test_prefix_longer_than_data_waits_without_stalling_others(dq: Running) -> None:
    stalled = socket.create_connection(("127.0.0.1", dq.port))
    stalled.sendall(b"0100{\"cmd\":")
    client = AsyncDqClient([dq.addr])
    t0 = time.monotonic()
    for i in range(50):
        await client.add("order", f"s{i}", {}, delay=60)
    assert time.monotonic() - t0 < 5
    stalled.close()
    await client.close()


async def test_pipelined_requests_answered_in_order(dq: Running) -> None:
    client = AsyncDqClient([dq.addr], many_frames=False)  # one add frame per job
    jobs = [{"topic": "order", "id": str(i), "body": {"i": i}, "delay": 60} for i in range(300)]
    jobs.insert(150, {"topic": "nope", "id": "x"})
    res = await client.add_many(jobs)
    assert res[150] is not None and res[150].err == "unknown_topic"
    assert all(r is None for i, r in enumerate(res) if i != 150)
    for i in (0, 149, 299):
        body = await client.get("order", str(i))
        assert body is not None and body["i"] == i
    await client.close()


async def test_connection_limit_refuses_excess_with_clear_error(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    running, ctx, task = await start_server(tmp_path, [redis_server.url], max_connections=3)
    held = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(3)]
    await until(lambda: len(running.server.connections) == 3, 5, "3 connections accepted")
    [reply] = await asyncio.to_thread(raw_exchange, running.port, b"", read=1)
    assert reply["err"] == "too_many_connections"
    for s in held:
        s.close()
    await until(lambda: not running.server.connections, 5, "the 3 connections closed")
    [pong] = await asyncio.to_thread(raw_exchange, running.port, frame({"cmd": "ping"}))
    assert pong["code"] == 1
    ctx.stopping.set()
    await task
    await running.store.shards.close()


async def test_client_fails_over_to_live_server(dq: Running) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_addr = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there now
    client = DqClient([dead_addr, dq.addr])
    for i in range(5):
        await asyncio.to_thread(client.add, "order", f"fo{i}", {}, delay=60)
    assert await asyncio.to_thread(client.get, "order", "fo4") is not None
    with pytest.raises(DqError) as info:
        await asyncio.to_thread(DqClient([dead_addr]).ping)
    assert info.value.err == "unavailable"


async def test_server_answers_unavailable_when_shard_is_down(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    running, ctx, task = await start_server(tmp_path, [redis_server.url])
    redis_server.stop()
    client = AsyncDqClient([running.addr])
    with pytest.raises(DqError) as info:
        await client.add("order", "x", {}, delay=1)
    assert info.value.err == "unavailable" and "retry" in info.value.msg
    assert await client.ping()
    await client.close()
    ctx.stopping.set()
    await task
    await running.store.shards.close()


async def test_batched_adds_survive_redis_losing_its_scripts(dq: Running) -> None:
    """A restarted Redis has no scripts: the batch's NOSCRIPT sends each add down the slow
    path, which reloads them; every add lands and is answered in order."""
    client = AsyncDqClient([dq.addr])
    await client.add("order", "warm", {}, delay=60)
    shard = dq.store.shards.shards[0]
    await shard.client.script_flush()
    jobs = [{"topic": "order", "id": f"n{i}", "body": {"i": i}, "delay": 60} for i in range(400)]
    res = await client.add_many(jobs)
    assert res == [None] * 400
    assert await shard.client.hlen(dq.store.keys.jobs) == 401
    for i in (0, 200, 399):
        body = await client.get("order", f"n{i}")
        assert body is not None and body["i"] == i
    stats = dq.server.handler.stats
    assert stats["add"] == 401 and stats["fail"] == 0
    await client.close()


# -- add_many frames ---------------------------------------------------------------------------

async def test_add_many_frame_answers_each_job_in_place(dq: Running) -> None:
    """One add_many frame: every job is an add of its own, a bad one fails alone with the
    error a lone add would get, and the reply lists the results in job order."""
    jobs: list[Any] = [
        {"topic": "order", "id": "m1", "body": {"i": 1}, "delay": 60},
        {"topic": "nope", "id": "m2"},
        {"topic": "order", "id": "", "body": {}},
        "not an object",
        {"topic": "off", "id": "m5"},
        {"topic": "order", "id": 6, "body": {"i": 6}, "due_ms": int(time.time() * 1000) + 9000},
        {"topic": "order", "id": "m7", "body": {"i": 7}, "delay": 1, "fix_time": "x"},
    ]
    [reply] = await asyncio.to_thread(raw_exchange, dq.port, frame({"cmd": "add_many",
                                                                    "jobs": jobs}))
    assert reply["code"] == 1
    data = reply["data"]
    assert len(data) == len(jobs)
    assert data[0] == 1 and data[5] == 1
    assert [d["err"] for d in (data[1], data[2], data[3], data[4], data[6])] == [
        "unknown_topic", "bad_request", "bad_request", "topic_offline", "bad_request"]
    assert "not registered" in data[1]["msg"] and "each job of add_many" in data[3]["msg"]
    assert "at most one of fix_time" in data[6]["msg"]
    assert await dq.store.shards.shards[0].client.hlen(dq.store.keys.jobs) == 2
    body = await dq.store.get("order", "6")
    assert body is not None and body["i"] == 6
    info = await dq.store.lookup("order", "m1")
    assert info is not None and abs(info.due_ms - (time.time() + 60) * 1000) < 2000
    assert dq.server.handler.stats["add"] == 2 and dq.server.handler.stats["fail"] == 5


@pytest.mark.parametrize("jobs", [None, [], "x", [{}] * 201])
async def test_add_many_frame_without_a_usable_job_list_is_refused_whole(
        dq: Running, jobs: Any) -> None:
    data = frame({"cmd": "add_many"} if jobs is None else {"cmd": "add_many", "jobs": jobs})
    bad, pong = await asyncio.to_thread(raw_exchange, dq.port, data + frame({"cmd": "ping"}),
                                        read=2)
    assert bad["code"] == 0 and bad["err"] == "bad_request"
    assert "jobs must be a list of 1 to 200" in bad["msg"]
    assert pong["code"] == 1  # the connection goes on
    assert await dq.store.shards.shards[0].client.hlen(dq.store.keys.jobs) == 0


async def test_add_many_frame_with_its_shard_down_says_unavailable_per_job(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    running, ctx, task = await start_server(tmp_path, [redis_server.url])
    redis_server.stop()
    jobs = [{"topic": "order", "id": str(i), "body": {}} for i in range(3)] + [
        {"topic": "nope", "id": "x"}]
    [reply] = await asyncio.to_thread(raw_exchange, running.port,
                                      frame({"cmd": "add_many", "jobs": jobs}), timeout=10)
    assert [d if d == 1 else d["err"] for d in reply["data"]] == [
        "unavailable", "unavailable", "unavailable", "unknown_topic"]
    assert "retry" in reply["data"][0]["msg"]
    ctx.stopping.set()
    await task
    await running.store.shards.close()


async def test_sync_client_add_many_sends_add_many_frames(dq: Running) -> None:
    client = DqClient([dq.addr])
    jobs = [{"topic": "order", "id": f"s{i}", "body": {"i": i}, "delay": 60} for i in range(450)]
    jobs[300] = {"topic": "nope", "id": "x"}
    res = await asyncio.to_thread(client.add_many, jobs, chunk=200)
    assert [i for i, r in enumerate(res) if r is not None] == [300]
    assert isinstance(res[300], DqError) and res[300].err == "unknown_topic"
    assert await dq.store.shards.shards[0].client.hlen(dq.store.keys.jobs) == 449
    body = await asyncio.to_thread(client.get, "order", "s449")
    assert body is not None and body["i"] == 449
    client.close()


async def test_replies_ready_at_once_behind_a_pending_one_do_not_recurse(dq: Running) -> None:
    """An add waiting for Redis, then 600 requests answered at once (unknown topics) in the
    same read: each ready reply queues behind the pending one. All 601 are answered, in
    order, and the connection goes on."""
    good = frame({"cmd": "add", "topic": "order", "id": "first", "body": {}, "delay": 60})
    bad = b"".join(frame({"cmd": "add", "topic": "nope", "id": str(i)}) for i in range(600))
    replies = await asyncio.to_thread(raw_exchange, dq.port, good + bad + frame({"cmd": "ping"}),
                                      read=602)
    assert len(replies) == 602
    assert replies[0]["code"] == 1 and replies[-1]["code"] == 1
    assert {r["err"] for r in replies[1:-1]} == {"unknown_topic"}
    assert dq.server.handler.stats["fail"] == 600


async def test_a_burst_answered_at_once_leaves_the_connection_reading(dq: Running) -> None:
    """200 pings in one write are started in slices of TURN_SLICE over several loop turns;
    after the last slice the connection reads again: a ping sent later is answered."""
    def talk() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", dq.port), timeout=5) as s:
            s.sendall(frame({"cmd": "ping"}) * 200)
            got = b""
            while len(got) < len(OK_EMPTY) * 200:
                got += s.recv(65536)
            time.sleep(0.1)
            s.sendall(frame({"cmd": "ping"}))
            return got, s.recv(65536)

    burst, later = await asyncio.to_thread(talk)
    assert burst == OK_EMPTY * 200
    assert later == OK_EMPTY


async def test_replies_are_written_with_or_without_the_stores_hook(dq: Running) -> None:
    """While serving, the store calls the server's flush_ready right after a batch's Redis
    reply is handed out (the replies go out in that loop turn); once the hook is removed
    (Server.stop, e.g. a cancelled server), a reply made ready inside a batch's reply is
    still written, at the end of its loop turn."""
    add = frame({"cmd": "add", "topic": "order", "id": "hooked", "body": {}, "delay": 60})
    assert dq.server.coalescer.flush_ready in dq.store.batch.on_batch_settled
    assert await asyncio.to_thread(raw_exchange, dq.port, add) == [
        {"code": 1, "msg": "succ", "data": []}]
    dq.server.stop()
    assert dq.server.coalescer.flush_ready not in dq.store.batch.on_batch_settled
    add = frame({"cmd": "add", "topic": "order", "id": "unhooked", "body": {}, "delay": 60})
    assert await asyncio.to_thread(raw_exchange, dq.port, add) == [
        {"code": 1, "msg": "succ", "data": []}]


async def test_a_server_that_cannot_listen_leaves_no_hook_on_its_store(
        dq: Running) -> None:
    """A second server on the first one's port cannot listen: it says why, and the store
    it shares keeps no hook of it (a stale hook would hold the server for good)."""
    from dq.master.supervise import BootError

    topics = TopicCache(dq.registry, refresh=0.2)
    await topics.refresh(force=True)
    settings = Settings(port=dq.port, host="127.0.0.1", redis=())
    other = Server(Context(settings, "server"), dq.store, topics)
    hooks = list(dq.store.batch.on_batch_settled)
    with pytest.raises(BootError, match=f"cannot listen on 127.0.0.1:{dq.port}"):
        await other.start()
    assert dq.store.batch.on_batch_settled == hooks and not other.coalescer.hooked


def read_frames(s: socket.socket, n: int | None = None) -> list[dict[str, Any]]:
    """Reply frames from a blocking socket: n of them, or all until the server closes."""
    out: list[dict[str, Any]] = []
    buf = b""
    while n is None or len(out) < n:
        while len(buf) >= 4 and len(buf) >= 4 + int(buf[:4]):
            size = int(buf[:4])
            out.append(json.loads(buf[4:4 + size]))
            buf = buf[4 + size:]
            if n is not None and len(out) == n:
                return out
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return out


async def test_a_half_closed_connection_gets_every_reply_then_is_closed(dq: Running) -> None:
    """A client that sends its requests and then shuts its side down (as `nc -N` does) is
    answered in full, as by the original server, even past one loop turn's slice."""
    await dq.store.add("order", "7", {"a": 1}, delay_ms=600_000)
    first = (frame({"cmd": "ping"}) + frame({"cmd": "get", "topic": "order", "id": "7"})
             + frame({"cmd": "add", "topic": "order", "id": "8", "body": {}}))
    many = frame({"cmd": "ping"}) * 300 + frame({"cmd": "del", "topic": "order", "id": "7"})

    def half_close(data: bytes) -> list[dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", dq.port), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return read_frames(s)  # until the server closes

    got = await asyncio.to_thread(half_close, first)
    assert [r["code"] for r in got] == [1, 1, 1]
    assert got[1]["data"]["a"] == 1 and await dq.store.get("order", "8") is not None
    got = await asyncio.to_thread(half_close, many)
    assert len(got) == 301 and all(r["code"] == 1 for r in got)
    assert await dq.store.get("order", "7") is None
    assert await asyncio.to_thread(half_close, b"") == []  # nothing sent: closed at once


async def test_quiet_connections_stay_open_unless_idle_timeout_is_set(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    """The original never closed a quiet connection, and its PHP client keeps one for the
    life of its process without reconnecting: by default dq does not close them either."""
    def two_adds(port: int, gap: float) -> list[dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            got = []
            for i in range(2):
                time.sleep(gap if i else 0)
                s.sendall(frame({"cmd": "add", "topic": "order", "id": f"q{i}", "body": {}}))
                got += read_frames(s, 1)
            return got

    for idle, expected in ((0.0, [1, 1]), (1.0, [1])):
        running, ctx, task = await start_server(tmp_path, [redis_server.url], idle_timeout=idle)
        try:
            got = await asyncio.to_thread(two_adds, running.port, 2.5)
            assert [r["code"] for r in got] == expected, (idle, got)
        finally:
            ctx.stopping.set()
            await asyncio.wait_for(task, 10)
            await running.store.shards.close()
            running.registry.close()
    with pytest.raises(ConfigError, match="idle_timeout"):
        load_settings({"idle_timeout": -1}, env={})


async def test_a_frame_is_not_stalled_while_the_server_is_not_reading(
        dq: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipelining client whose replies it reads slowly makes the server pause reading
    with part of a frame read: that frame's clock stands still meanwhile, and the reaper
    does not close the connection as stalled."""
    monkeypatch.setattr(dq_connection, "FRAME_TIMEOUT", 0.5)
    await dq.store.add("order", "big", {"pad": "x" * 8000}, delay_ms=600_000)
    get = frame({"cmd": "get", "topic": "order", "id": "big"})
    last = frame({"cmd": "ping"})

    def slow_reader() -> list[dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", dq.port), timeout=10) as s:
            s.sendall(get * 1500 + last[:5])  # ~12 MB of replies, then half a frame
            time.sleep(2.5)  # the reaper looks twice while the server cannot write
            got = read_frames(s, 1500)
            s.sendall(last[5:])
            return got + read_frames(s, 1)

    got = await asyncio.to_thread(slow_reader)
    assert len(got) == 1501 and all(r["code"] == 1 for r in got)
