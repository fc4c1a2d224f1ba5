"""Registry and TopicCache on real SQLite and real MariaDB (the `db_url` fixture runs both)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from dq.registry.core import AlertConf, Registry, ShardConf, Topic
from dq.registry.models import Base
from dq.registry.schema import create_tables, make_engine
from dq.registry.topics import TopicCache
from dq.registry.values import normalise_redis_url
from tests.support.registry import ORIGINAL_MYSQL, ORIGINAL_SQLITE, run_script
from tests.support.waits import until

SCHEMA_SQL = Path(__file__).parent.parent / "sql" / "schema.sql"


# Only the original's columns, as the PHP console writes them.
OLD_ROW = sa.text(
    "INSERT INTO dq_topic (t_name, delay, callback, timeout, email, topic, createor, "
    "status, method, priority) VALUES ('订单取消', 1800, 'http://127.0.0.1/cb', 5000, "
    "'a@example.com, b@example.com', :topic, 'alice', 1, 'post', 1)"
)


def raw(engine: sa.Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


@pytest.fixture
def registry(db_url: str) -> Iterator[Registry]:
    reg = Registry(db_url)
    yield reg
    reg.close()


def topic(key: str = "order", **kw: object) -> Topic:
    values: dict[str, object] = {"topic": key, "name": "cancel order", "delay": 30,
                                 "callback": "http://127.0.0.1:9/cb"}
    values.update(kw)
    return Topic(**values)  # type: ignore[arg-type]


def test_topic_crud(registry: Registry) -> None:
    assert registry.get_topic("order") is None
    saved = registry.save_topic(topic(method="post", emails=("a@x.com, b@x.com",), priority=9,
                                      retry_when=" code != 200 ", body_format="JSON",
                                      timeout_ms=1500, max_attempts=4, secret="k",
                                      creator="bob", online=False))
    assert saved.id > 0
    assert saved == Topic(id=saved.id, topic="order", name="cancel order", delay=30,
                          callback="http://127.0.0.1:9/cb", method="POST", timeout_ms=1500,
                          emails=("a@x.com", "b@x.com"), retry_when="code != 200", priority=2,
                          online=False, max_attempts=4, secret="k", body_format="json",
                          creator="bob")
    assert registry.get_topic("order") == saved
    assert registry.topics() == {"order": saved}

    updated = registry.save_topic(topic(callback="http://127.0.0.1:9/v2", online=True))
    assert updated.id == saved.id
    assert registry.get_topic("order") == updated
    assert updated.callback.endswith("/v2") and updated.online and updated.priority == 2

    other = registry.save_topic(topic("Order"))  # keys are case-sensitive on both databases
    assert other.id != saved.id
    assert set(registry.topics()) == {"order", "Order"}

    assert registry.delete_topic("order") is True
    assert registry.delete_topic("order") is False
    assert registry.get_topic("order") is None
    assert registry.get_topic("Order") == other
    with pytest.raises(ValueError):
        registry.save_topic(topic(" "))


def test_old_style_row_gets_defaults(registry: Registry) -> None:
    raw(registry.engine, OLD_ROW.text, topic="legacy")
    t = registry.get_topic("legacy")
    assert t is not None
    assert (t.name, t.delay, t.callback, t.timeout_ms) == ("订单取消", 1800, "http://127.0.0.1/cb",
                                                           5000)
    assert t.emails == ("a@example.com", "b@example.com")
    assert t.method == "POST" and t.priority == 1 and t.online and t.creator == "alice"
    assert t.retry_when == ""  # the column default '重试标记' means "no expression"
    assert (t.max_attempts, t.secret, t.body_format) == (10, "", "form")


def test_new_database_has_unique_topic_key(registry: Registry) -> None:
    raw(registry.engine, OLD_ROW.text, topic="dup")
    with pytest.raises(sa.exc.IntegrityError):
        raw(registry.engine, OLD_ROW.text, topic="dup")


@pytest.mark.parametrize("flavour", ["sqlite", "mariadb"])
def test_upgrade_old_php_delayqueue_tables(flavour: str, request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    if flavour == "sqlite":
        url, ddl = f"sqlite:///{tmp_path / 'old.sqlite3'}", ORIGINAL_SQLITE
    else:
        url, ddl = request.getfixturevalue("mariadb_url"), ORIGINAL_MYSQL
    engine = make_engine(url)
    run_script(engine, ddl)
    raw(engine, OLD_ROW.text, topic="order")
    raw(engine, OLD_ROW.text, topic="order")  # old databases may hold duplicates
    raw(engine, "UPDATE dq_topic SET callback = 'http://127.0.0.1/newest' WHERE id = 2")
    raw(engine, "INSERT INTO dq_redis (t_name, t_content) VALUES ('r1', '10.0.0.1:6380:pw')")
    raw(engine, "INSERT INTO dq_alert (host, port, user, pwd, ext) VALUES "
                "('smtp.example.com', 465, 'dq@example.com', 'pw', :ext)",
        ext='{"redis": "ops@example.com, dba@example.com"}')
    raw(engine, "INSERT INTO dq_stat (u_key, num) VALUES ('1_tw', 5)")

    create_tables(engine)
    create_tables(engine)  # idempotent
    columns = {c["name"] for c in sa.inspect(engine).get_columns("dq_topic")}
    assert {"max_attempts", "secret", "body_format", "updated_at", "rate_limit",
            "concurrency", "paused"} <= columns

    reg = Registry(url)
    try:
        t = reg.get_topic("order")
        assert t is not None and t.id == 2 and t.callback == "http://127.0.0.1/newest"
        assert reg.topics()["order"] == t
        # The original sent a POST's fields as a form body (DqCurl::add_post_field,
        # http_build_query): its topics get 'form', as topics made since do.
        assert (t.retry_when, t.max_attempts, t.body_format) == ("", 10, "form")
        # Rows the original console writes get no flow control (issue 20's columns).
        assert (t.rate_limit, t.concurrency, t.paused) == (0, 0, False)
        limited = reg.save_topic(topic("new", rate_limit=40, concurrency=3, paused=True))
        assert (limited.rate_limit, limited.concurrency, limited.paused) == (40, 3, True)
        assert reg.get_topic("new") == limited
        raw(engine, OLD_ROW.text, topic="new")  # the original console, after dq's upgrade
        assert reg.get_topic("new").paused is False  # type: ignore[union-attr]
        assert reg.save_topic(topic("new")).body_format == "form"
        assert reg.get_topic("new").body_format == "form"  # type: ignore[union-attr]
        assert reg.delete_topic("new")
        [shard] = reg.shards()
        assert (shard.name, shard.url, shard.enabled) == ("r1", "redis://:pw@10.0.0.1:6380/0", True)
        alert = reg.alert()
        assert (alert.host, alert.port, alert.user, alert.password) == (
            "smtp.example.com", 465, "dq@example.com", "pw")
        assert alert.redis_emails == ("ops@example.com", "dba@example.com")
        reg.stat_incr("1_tw", 2)
        assert reg.stat_get("1_tw") == 7

        fp = reg.fingerprint()
        assert reg.save_topic(topic("order", delay=5)).id == 2  # the row workers read
        assert reg.fingerprint() != fp
        assert reg.delete_topic("order") is True
        assert reg.topics() == {}
    finally:
        reg.close()
        engine.dispose()


@pytest.mark.parametrize("flavour", ["sqlite", "mariadb"])
def test_topics_an_earlier_upgrade_marked_query_are_repaired(
        flavour: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """dq up to 0.3 set body_format 'query' on every row of an original table it upgraded
    (updated_at stays NULL: only dq's own saves set it). Those rows send a form body again;
    a topic saved through dq as 'query' since keeps it."""
    if flavour == "sqlite":
        url, ddl = f"sqlite:///{tmp_path / 'old.sqlite3'}", ORIGINAL_SQLITE
    else:
        url, ddl = request.getfixturevalue("mariadb_url"), ORIGINAL_MYSQL
    engine = make_engine(url)
    try:
        run_script(engine, ddl)
        raw(engine, OLD_ROW.text, topic="legacy")
        raw(engine, OLD_ROW.text, topic="chosen")
        # What an earlier dq's upgrade left: the new columns, every topic 'query'.
        for column in ("max_attempts int NOT NULL DEFAULT 10",
                       "secret varchar(255) NOT NULL DEFAULT ''",
                       "body_format varchar(16) NOT NULL DEFAULT 'form'",
                       "updated_at datetime NULL"):
            raw(engine, f"ALTER TABLE dq_topic ADD COLUMN {column}")
        raw(engine, "UPDATE dq_topic SET body_format = 'query'")
        raw(engine, "UPDATE dq_topic SET updated_at = '2026-01-02 03:04:05' "
                    "WHERE topic = 'chosen'")  # saved in dq's console since, as 'query'
        reg = Registry(url)
        try:
            assert reg.get_topic("legacy").body_format == "form"  # type: ignore[union-attr]
            assert reg.get_topic("chosen").body_format == "query"  # type: ignore[union-attr]
            reg.save_topic(topic("legacy", method="POST", body_format="query"))
        finally:
            reg.close()
        reg = Registry(url)  # a later start leaves a 'query' saved through dq alone
        try:
            assert reg.get_topic("legacy").body_format == "query"  # type: ignore[union-attr]
        finally:
            reg.close()
    finally:
        engine.dispose()


def test_schema_sql_is_the_models_and_upgrades_the_original(mariadb_url: str) -> None:
    engine = make_engine(mariadb_url)
    try:
        run_script(engine, SCHEMA_SQL.read_text())
        insp = sa.inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in insp.get_columns(table.name)} == set(table.c.keys())
        # The commented ALTERs turn the original tables into the same column sets.
        with engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                conn.exec_driver_sql(f"DROP TABLE {table.name}")
        run_script(engine, ORIGINAL_MYSQL)
        run_script(engine, SCHEMA_SQL.read_text())  # creates only dq's own tables
        alters = re.findall(r"^-- (ALTER TABLE .*);$", SCHEMA_SQL.read_text(), re.M)
        run_script(engine, ";\n".join(alters))
        insp = sa.inspect(engine)
        for table in Base.metadata.sorted_tables:
            assert {c["name"] for c in insp.get_columns(table.name)} == set(table.c.keys())
    finally:
        engine.dispose()


def test_concurrent_create_tables(db_url: str) -> None:
    engine = make_engine(db_url)
    errors: list[BaseException] = []

    def boot() -> None:
        try:
            create_tables(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=boot) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    engine.dispose()
    assert errors == []


def test_fingerprint_sees_raw_changes(registry: Registry) -> None:
    empty = registry.fingerprint()
    assert registry.fingerprint() == empty
    registry.save_topic(topic("a", callback="http://h/a"))
    registry.save_topic(topic("b", callback="http://h/b"))
    seen = {empty, registry.fingerprint()}
    for sql in (
        "UPDATE dq_topic SET callback = 'http://h/x' WHERE topic = 'a'",  # same length
        "UPDATE dq_topic SET status = 2 WHERE topic = 'a'",
        "UPDATE dq_topic SET topic = 'c' WHERE topic = 'a'",
        "UPDATE dq_topic SET max_attempts = 3 WHERE topic = 'b'",
        "DELETE FROM dq_topic WHERE topic = 'b'",
    ):
        raw(registry.engine, sql)
        fp = registry.fingerprint()
        assert fp not in seen, sql
        seen.add(fp)


async def test_topic_cache_follows_the_database(registry: Registry) -> None:
    registry.save_topic(topic("order", delay=10))
    cache = TopicCache(registry, refresh=0.2)
    assert cache.get_nowait("order") is None  # nothing is read before the first get
    first = await cache.get("order")
    assert first is not None and first.delay == 10
    assert cache.get_nowait("order") is first
    await asyncio.sleep(0.3)
    assert await cache.get("order") is first  # fingerprint unchanged: no reload

    raw(registry.engine, "UPDATE dq_topic SET delay = 99 WHERE topic = 'order'")
    raw(registry.engine, OLD_ROW.text, topic="fresh")
    start = time.monotonic()
    while (t := await cache.get("order")) is not None and t.delay != 99:
        assert time.monotonic() - start < 2, "cache did not see the raw UPDATE"
        await asyncio.sleep(0.05)
    assert time.monotonic() - start < 0.2 + 0.5
    assert cache.get_nowait("fresh") is not None

    raw(registry.engine, "DELETE FROM dq_topic WHERE topic = 'fresh'")
    await cache.refresh(force=True)
    assert cache.get_nowait("fresh") is None


async def test_topic_cache_keeps_topics_when_the_database_fails(
        registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    registry.save_topic(topic("order"))
    cache = TopicCache(registry, refresh=0.1)
    assert await cache.get("order") is not None
    raw(registry.engine, "ALTER TABLE dq_topic RENAME TO dq_topic_away")
    try:
        async def kept_through_a_failed_refresh() -> bool:  # a get past the interval
            assert (await cache.get("order")) is not None
            return "registry refresh failed" in caplog.text

        await until(kept_through_a_failed_refresh, 5, "a failed refresh")
    finally:
        raw(registry.engine, "ALTER TABLE dq_topic_away RENAME TO dq_topic")
    registry.save_topic(topic("later"))
    # recovered on a later interval
    await until(lambda: cache.get("later"), 5, "the topic added later")


@pytest.mark.parametrize(("text", "url"), [
    ("127.0.0.1:6379:secret", "redis://:secret@127.0.0.1:6379/0"),
    (" 127.0.0.1:6379 ", "redis://127.0.0.1:6379/0"),
    ("10.0.0.1:6380:p@ss/w:rd,10.0.0.2:6380:x", "redis://:p%40ss%2Fw%3Ard@10.0.0.1:6380/0"),
    ("redis-host", "redis://redis-host:6379/0"),
    ("rediss://:pw@h:6380/2", "rediss://:pw@h:6380/2"),
    ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
])
def test_normalise_redis_url(text: str, url: str) -> None:
    assert normalise_redis_url(text) == url


@pytest.mark.parametrize("bad", ["", ":6379", "host:port"])
def test_normalise_redis_url_refuses_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_redis_url(bad)


def test_shards(registry: Registry) -> None:
    assert registry.shards() == []
    s1 = registry.save_shard("s1", "127.0.0.1:6379:secret")
    assert s1 == ShardConf(s1.id, "s1", "redis://:secret@127.0.0.1:6379/0", True)
    s2 = registry.save_shard("s2", "redis://127.0.0.1:6380/0", enabled=False)
    raw(registry.engine, "INSERT INTO dq_redis (t_name, t_content) VALUES ('bad', '')")
    assert registry.shards() == [s1, s2]  # the unusable row is skipped
    again = registry.save_shard("s1", "redis://127.0.0.1:6381/0")
    assert again.id == s1.id and registry.shards()[0].url == "redis://127.0.0.1:6381/0"
    with pytest.raises(ValueError):
        registry.save_shard("s3", "not a url:x")
    assert registry.delete_shard(s2.id) is True
    assert registry.delete_shard(s2.id) is False
    assert [s.name for s in registry.shards()] == ["s1"]


def test_alert_round_trip(registry: Registry) -> None:
    assert registry.alert() == AlertConf()
    conf = AlertConf(host="127.0.0.1", port=2525, user="u", password="p", tls="starttls",
                     sender="dq@example.com", redis_emails=("ops@example.com",), ext="{}")
    registry.save_alert(conf)
    assert registry.alert() == conf
    registry.save_alert(AlertConf(host="smtp2", port=465, tls="ssl"))
    assert registry.alert() == AlertConf(host="smtp2", port=465, tls="ssl")
    with registry.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT COUNT(*) FROM dq_alert")) == 1
    with pytest.raises(ValueError):
        registry.save_alert(AlertConf(tls="tls"))


def test_stats(registry: Registry) -> None:
    assert registry.stat_get("k") == 0
    registry.stat_incr("k", 3)
    registry.stat_incr("k")
    registry.stat_incr("other", 1)
    assert (registry.stat_get("k"), registry.stat_get("other")) == (4, 1)
