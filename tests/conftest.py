"""Real parts for tests: redis-server processes on free ports, a MariaDB database per run."""

from __future__ import annotations

import compileall
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from dq.config import Settings
from dq.registry.core import Registry, Topic
from dq.runtime.context import open_store
from dq.storage.store import Store
from tests.support import lanes
from tests.support.kinds import kind, needs_own_redis
from tests.support.paths import REPO
from tests.support.procs import free_port
from tests.support.receiver import Receiver
from tests.support.redisproc import RedisDb, RedisProcess, SharedRedis
from tests.support.roles import Mailbox, Roles


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: the system tests' lanes (3 on 2 cores) and a worker a core beside them
    for the rest, at least 4 in all. More lanes were faster but starved tests that wait on
    processes (README: Run the tests, for the figures)."""
    return max(4, system_lanes() + (os.cpu_count() or 1))


_KINDS = ("system", "integration", "unit")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile dq and web once, before the workers start: the tests start some 300 child
    processes, and where PYTHONDONTWRITEBYTECODE is set (as on CI) each would compile
    every module it imports again (a quarter of a second a child here)."""
    if not hasattr(session.config, "workerinput"):
        for package in ("dq", "web"):
            compileall.compile_dir(REPO / package, quiet=1)


def system_lanes() -> int:
    """How many system tests run at once under xdist: 1.5 a core (DQ_TEST_SYSTEM_LANES)."""
    cores = os.cpu_count() or 1
    return max(1, int(os.environ.get("DQ_TEST_SYSTEM_LANES", "0")) or cores + cores // 2)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker names each test by its group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked system, integration or unit (tests/support/kinds.py), from what
    it reaches, unless it says so itself (`@pytest.mark.system` where what it starts is out
    of sight, e.g. behind an example's module): `-m "not system"` is the fast subset.

    The system tests, and those marked `timing` (they measure the server's loop with a
    canary), are dealt into `system_lanes()` xdist groups (pyproject's `--dist=loadgroup`
    runs each group on one worker, in turn), longest first to the lane with the least time
    so far (tests/support/lanes.py), and go first: the other workers take the rest.
    Each system test starts several processes (a dq-master and its children, Redis nodes, a
    browser): run as they came, six at once on two cores, they starved each other into
    timeouts, a different test each run."""
    kinds: dict[str, str] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs if info is not None else {}
        fixtures = {name: d[-1].func for name, d in defs.items() if d}
        given = [m.name for m in item.iter_markers() if m.name in _KINDS]
        kinds[item.nodeid] = given[0] if given else kind(
            getattr(item, "function", None), fixtures, getattr(item, "fixturenames", ()))
        if not given:
            item.add_marker(getattr(pytest.mark, kinds[item.nodeid]))
        if "redis_server" in getattr(item, "fixturenames", ()) and (
                kinds[item.nodeid] == "system" or needs_own_redis(item.function, fixtures)):
            item.add_marker(pytest.mark.own_redis)
    laned = [item for item in items
             if kinds[item.nodeid] == "system" or item.get_closest_marker("timing")]
    dealt = lanes.deal([item.nodeid for item in laned], system_lanes(), lanes.load())
    for item in laned:
        item.add_marker(pytest.mark.xdist_group(f"system-{dealt[item.nodeid]}"))
    ids = {item.nodeid for item in laned}
    items[:] = laned + [item for item in items if item.nodeid not in ids]


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    started: list[RedisProcess] = []

    def make(*, appendonly: bool = True) -> RedisProcess:
        r = RedisProcess(tmp_path, appendonly=appendonly).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    """One redis-server per xdist worker, lent a database at a time (SharedRedis)."""
    shared = SharedRedis(tmp_path_factory.mktemp("shared-redis"))
    yield shared
    shared.close()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, redis_factory: Callable[..., RedisProcess],
                 ) -> Iterator[RedisProcess | RedisDb]:
    """A clean Redis for the test: a database of its worker's shared redis-server, or a
    redis-server of its own for a test marked `own_redis` (conftest marks the system
    tests, and those that stop, pause, configure or reach their Redis by port:
    tests/support/kinds.py)."""
    if request.node.get_closest_marker("own_redis") is not None:
        yield redis_factory()
        return
    shared: SharedRedis = request.getfixturevalue("shared_redis")
    db = shared.lend()
    yield db
    shared.check()


# The MariaDB tests' server: DQ_TEST_MYSQL, a SQLAlchemy URL without a database
# (mysql+pymysql://USER:PASSWORD@HOST:PORT); each test creates and drops its own database.
# Unset, they use MYSQL_DEFAULT when a MariaDB answers there and are skipped (saying how to
# run them) when none does; set (as .ci/run does), a MariaDB that is not there is an error.
MYSQL_DEFAULT = "mysql+pymysql://root:@127.0.0.1:3306"
_mysql_absent: list[str] = []  # why MYSQL_DEFAULT did not answer, once looked at ('' = it did)


def mariadb_server() -> str:
    """The URL of the MariaDB server the tests use, or a skip when there is none and
    DQ_TEST_MYSQL does not ask for one."""
    import sqlalchemy as sa

    url = os.environ.get("DQ_TEST_MYSQL")
    if url:
        return url
    if not _mysql_absent:
        engine = sa.create_engine(MYSQL_DEFAULT + "/", connect_args={"connect_timeout": 3})
        try:
            with engine.connect():
                _mysql_absent.append("")
        except sa.exc.OperationalError as exc:
            _mysql_absent.append(str(exc.orig))
        finally:
            engine.dispose()
    if _mysql_absent[0]:
        pytest.skip(f"no MariaDB at {MYSQL_DEFAULT} ({_mysql_absent[0]}); to run the MariaDB "
                    "tests start one there, or set DQ_TEST_MYSQL=mysql+pymysql://USER:PASSWORD"
                    "@HOST:PORT (with it set, a missing MariaDB fails them, as in .ci/run)")
    return MYSQL_DEFAULT


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A uniquely named MariaDB database for this test, dropped afterwards."""
    import sqlalchemy as sa

    server = mariadb_server()
    name = f"dq_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server + "/", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    try:
        yield f"{server}/{name}?charset=utf8mb4"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each registry test runs on SQLite and on MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dq.sqlite3'}"
    url: str = request.getfixturevalue("mariadb_url")
    return url


@pytest.fixture(autouse=True)
def no_login_throttle(request: pytest.FixtureRequest) -> Iterator[None]:
    """Wrong passwords are answered at once and never limited in tests (the 0.3 s wait cost
    ~80 s a run), except in tests marked `login_throttle`, which check the wait and limits."""
    import web.throttle

    saved = web.throttle.LIMITS
    if request.node.get_closest_marker("login_throttle") is None:
        web.throttle.LIMITS = web.throttle.Limits(wait=0.0, limited=False)
    yield
    web.throttle.LIMITS = saved


# -- the delivery tests' fixtures (test_delivery, test_flow, test_flow_retry, test_adopt):
# each module defines its own `settings`, and these build on it.

@pytest.fixture
def registry(settings: Settings) -> Iterator[Registry]:
    reg = Registry(settings.db)
    yield reg
    reg.close()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    s = open_store(settings)
    yield s
    await s.shards.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.fixture
async def roles(settings: Settings) -> AsyncIterator[Roles]:
    r = Roles(settings)
    yield r
    await r.stop()


@pytest.fixture
def topic(registry: Registry, receiver: Receiver) -> Callable[..., Topic]:
    def make(key: str, **kw: Any) -> Topic:
        kw.setdefault("callback", receiver.url(f"/{key}"))
        kw.setdefault("method", "POST")
        return registry.save_topic(Topic(topic=key, name=key, **kw))
    return make


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    yield box, port
    ctl.stop()
