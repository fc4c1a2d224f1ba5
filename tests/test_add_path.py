"""The add path when a shard cannot take a job: a shard that refuses writes (out of memory,
a read-only replica) says so in a line, and a shard that hangs does not hold adds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import RedisProcess
from tests.test_server import Running, frame, raw_exchange, start_server

SECRET = "body-marker-" + "x" * 200  # in every job's body: must never reach a log line


async def stop(running: Running, ctx: Any, task: asyncio.Task[None]) -> None:
    ctx.stopping.set()
    await asyncio.wait_for(task, 10)
    await running.store.shards.close()
    running.registry.close()


def add(i: int | str) -> dict[str, Any]:
    return {"cmd": "add", "topic": "order", "id": str(i), "body": {"s": SECRET}, "delay": 60}


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "write(s) refused" in r.getMessage()]


def assert_no_body_logged(caplog: pytest.LogCaptureFixture) -> None:
    for r in caplog.records:
        assert SECRET not in r.getMessage() and r.exc_info is None, r.getMessage()


async def test_a_shard_out_of_memory_says_so_and_logs_one_line(
        tmp_path: Path, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture) -> None:
    running, ctx, task = await start_server(tmp_path, [redis_server.url])
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        [ok] = await asyncio.to_thread(raw_exchange, running.port, frame(add("before")))
        assert ok["code"] == 1
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write that needs memory is refused
        caplog.set_level(logging.INFO)
        replies = await asyncio.to_thread(
            raw_exchange, running.port, b"".join(frame(add(i)) for i in range(20)), read=20)
        for reply in replies:
            assert reply["code"] == 0 and reply["err"] == "unavailable", reply
            assert (f"redis shard {redis_server.url} is out of memory (maxmemory): job not "
                    "stored") in reply["msg"]
            assert "ResponseError" not in reply["msg"]
        many = {"cmd": "add_many", "jobs": [{k: v for k, v in add(f"m{i}").items() if k != "cmd"}
                                             for i in range(3)]}
        [reply] = await asyncio.to_thread(raw_exchange, running.port, frame(many))
        assert [d["err"] for d in reply["data"]] == ["unavailable"] * 3
        assert "out of memory (maxmemory): job not stored" in reply["data"][0]["msg"]
        # one line for all of them (rate-limited), without the jobs' bodies or a traceback
        [line] = refusal_lines(caplog)
        assert "is out of memory (maxmemory)" in line.getMessage()
        assert_no_body_logged(caplog)
        # it still answers reads: the job stored before is there, and get works
        [got] = await asyncio.to_thread(raw_exchange, running.port,
                                        frame({"cmd": "get", "topic": "order", "id": "before"}))
        assert got["code"] == 1 and got["data"]["s"] == SECRET
        await admin.config_set("maxmemory", 0)
        [ok] = await asyncio.to_thread(raw_exchange, running.port, frame(add("after")))
        assert ok["code"] == 1
        assert await running.store.get("order", "0") is None
        assert await running.store.get("order", "after") is not None
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
        await stop(running, ctx, task)


async def test_a_read_only_replica_says_so(
        tmp_path: Path, redis_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    master, replica = redis_factory(), redis_factory()
    admin = aioredis.Redis.from_url(replica.url)
    await admin.execute_command("REPLICAOF", "127.0.0.1", master.port)
    running, ctx, task = await start_server(tmp_path, [replica.url])
    try:
        caplog.set_level(logging.INFO)
        replies = await asyncio.to_thread(
            raw_exchange, running.port, b"".join(frame(add(i)) for i in range(5)), read=5)
        for reply in replies:
            assert reply["code"] == 0 and reply["err"] == "unavailable", reply
            assert f"redis shard {replica.url} is a read-only replica: job not stored" \
                in reply["msg"]
            assert "redis+sentinel://" in reply["msg"]
        [line] = refusal_lines(caplog)
        assert "is a read-only replica" in line.getMessage()
        assert_no_body_logged(caplog)
        [pong] = await asyncio.to_thread(raw_exchange, running.port, frame({"cmd": "ping"}))
        assert pong["code"] == 1
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await admin.aclose()
        await stop(running, ctx, task)
