"""The registry: topics, Redis shards, alert settings and counters, kept in SQL.

Tables and columns are php-delayqueue's (`dq_topic`, `dq_redis`, `dq_alert`, `dq_stat`)
plus added columns that all have defaults, so an existing php-delayqueue database keeps
working and its console may keep writing rows. Only this module knows SQL.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import reduce
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dq.config import Settings
from dq.registry import headers as hdr
from dq.registry.retry_policy import DEFAULT as DEFAULT_POLICY
from dq.sharding import shardurl

log = logging.getLogger("dq.registry")

RETRY_PLACEHOLDER = "重试标记"  # the original's column default; it means "no expression"
OFFLINE = 2  # what the original console writes for an offline topic
# How a POST callback carries the body: form (urlencoded body, as the original sent it),
# json, or query (the fields in the query string and an empty body; dq/roles/callback.py)
BODY_FORMATS = ("form", "json", "query")
_MYSQL = ("mysql", "mariadb")
_TABLE_ARGS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
_TINYINT = sa.SmallInteger().with_variant(mysql.TINYINT(), *_MYSQL)
BREAKER_COOLOFF = 60  # seconds, a topic's breaker_cooloff unless set
MAX_RATE = 100_000  # a topic's rate_limit, callbacks per second
MAX_CONCURRENCY = 10_000  # a topic's concurrency


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _str(length: int, default: str = "") -> sa.orm.MappedColumn[Any]:
    # Both defaults: the server one for rows other programs insert, the Python one for ours.
    return mapped_column(sa.String(length), nullable=False, default=default,
                         server_default=default)


def _int(default: int, type_: Any = sa.Integer) -> sa.orm.MappedColumn[Any]:
    return mapped_column(type_, nullable=False, default=default, server_default=str(default))


class Base(DeclarativeBase):
    pass


class TopicRow(Base):
    __tablename__ = "dq_topic"
    # Only tables we create get the unique key; old ones may hold duplicates (highest id wins).
    __table_args__ = (sa.UniqueConstraint("topic", name="uk_topic"), _TABLE_ARGS)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    t_name: Mapped[str] = _str(1024)
    delay: Mapped[int] = _int(0)
    callback: Mapped[str] = _str(1024)
    timeout: Mapped[int] = _int(3000)
    email: Mapped[str] = _str(1024)
    # Binary collation on MySQL so topic keys compare case-sensitively, as on SQLite.
    topic: Mapped[str] = mapped_column(
        sa.String(255).with_variant(mysql.VARCHAR(255, collation="utf8mb4_bin"), *_MYSQL),
        nullable=False, default="", server_default="")
    re_notify_flag: Mapped[str] = _str(1024, RETRY_PLACEHOLDER)
    createor: Mapped[str] = _str(1024)
    status: Mapped[int] = _int(1, _TINYINT)
    method: Mapped[str] = _str(32, "GET")
    priority: Mapped[int] = _int(2)
    max_attempts: Mapped[int] = _int(10)
    secret: Mapped[str] = _str(255)
    body_format: Mapped[str] = _str(16, "form")
    rate_limit: Mapped[int] = _int(0)
    concurrency: Mapped[int] = _int(0)
    paused: Mapped[int] = _int(0, _TINYINT)
    retry_policy: Mapped[str] = _str(255, DEFAULT_POLICY)
    breaker_threshold: Mapped[int] = _int(0)
    breaker_cooloff: Mapped[int] = _int(BREAKER_COOLOFF)
    headers: Mapped[str] = _str(hdr.MAX_STORED)
    updated_at: Mapped[datetime | None] = mapped_column(sa.DateTime, nullable=True)  # UTC


class RedisRow(Base):
    __tablename__ = "dq_redis"
    __table_args__ = _TABLE_ARGS

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    t_name: Mapped[str] = _str(200)
    t_content: Mapped[str] = _str(2048)
    status: Mapped[int] = _int(1, _TINYINT)


class AlertRow(Base):
    __tablename__ = "dq_alert"
    __table_args__ = _TABLE_ARGS

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = _str(255)
    port: Mapped[int] = _int(0)
    user: Mapped[str] = _str(255)
    pwd: Mapped[str] = _str(255)
    ext: Mapped[str] = _str(2048)
    tls: Mapped[str] = _str(16)
    sender: Mapped[str] = _str(255)
    redis_emails: Mapped[str] = _str(1024)


class StatRow(Base):
    __tablename__ = "dq_stat"
    __table_args__ = (sa.UniqueConstraint("u_key", name="u_key"), _TABLE_ARGS)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    u_key: Mapped[str] = _str(255)
    num: Mapped[int] = _int(0)
    # The original's '0000-00-00' default is refused by strict MySQL modes; now() is not.
    create_time: Mapped[datetime] = mapped_column(
        sa.TIMESTAMP, nullable=False, server_default=sa.func.current_timestamp())
    update_time: Mapped[datetime] = mapped_column(
        sa.TIMESTAMP, nullable=False, server_default=sa.func.current_timestamp())


class StatMarkRow(Base):
    """How much of one of dq's Redis counters has gone into dq_stat (Registry.export_stats):
    its value at the last export. Only dq uses this table."""

    __tablename__ = "dq_stat_mark"
    __table_args__ = (sa.UniqueConstraint("mark", name="uk_mark"), _TABLE_ARGS)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    mark: Mapped[str] = _str(255)
    num: Mapped[int] = _int(0, sa.BigInteger)
    day: Mapped[str] = _str(8)  # YYYYMMDD of a per-day counter, '' for a total
    update_time: Mapped[datetime | None] = mapped_column(sa.DateTime, nullable=True)  # UTC


STAT_LOCK = "#lock"  # the dq_stat_mark row exporters lock to take turns


def _split_list(value: str | Iterable[str]) -> tuple[str, ...]:
    """Comma (or semicolon / blank) separated addresses as a tuple, blanks dropped."""
    items = [value] if isinstance(value, str) else value
    return tuple(p for item in items for p in re.split(r"[,;\s]+", item) if p)


@dataclass(frozen=True)
class Topic:
    """A registered topic as workers see it: plain normalised values, no ORM session.

    Building one normalises it: method is 'GET' or 'POST', priority 1..3 (else 2),
    body_format one of BODY_FORMATS (else 'form'), and the original's placeholder retry flag
    becomes ''.
    """

    id: int = 0
    topic: str = ""
    name: str = ""
    delay: int = 0  # seconds
    callback: str = ""
    method: str = "GET"
    timeout_ms: int = 3000
    emails: tuple[str, ...] = ()
    retry_when: str = ""  # '' = no expression
    priority: int = 2
    online: bool = True
    max_attempts: int = 0  # 0 = the server's default
    secret: str = ""
    body_format: str = "form"
    creator: str = ""
    rate_limit: int = 0  # callbacks per second, 0 = no limit
    concurrency: int = 0  # callbacks in flight at once, 0 = no limit
    paused: bool = False  # adds are taken, nothing is called
    retry_policy: str = DEFAULT_POLICY  # dq/registry/retry_policy.py
    breaker_threshold: int = 0  # failures in a row that open the breaker, 0 = no breaker
    breaker_cooloff: int = BREAKER_COOLOFF  # seconds an open breaker waits before its probe
    headers: hdr.Headers = ()  # fixed request headers (dq/registry/headers.py)

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("method", "POST" if self.method.strip().upper() == "POST" else "GET")
        fix("priority", self.priority if self.priority in (1, 2, 3) else 2)
        retry = self.retry_when.strip()
        fix("retry_when", "" if retry == RETRY_PLACEHOLDER else retry)
        fmt = self.body_format.strip().lower()
        fix("body_format", fmt if fmt in BODY_FORMATS else "form")
        fix("emails", _split_list(self.emails))
        fix("callback", self.callback.strip())
        fix("delay", max(0, self.delay))
        fix("timeout_ms", self.timeout_ms if self.timeout_ms > 0 else 3000)
        fix("max_attempts", max(0, self.max_attempts))
        fix("rate_limit", max(0, self.rate_limit))
        fix("concurrency", max(0, self.concurrency))
        fix("paused", bool(self.paused))
        fix("retry_policy", self.retry_policy.strip() or DEFAULT_POLICY)
        fix("breaker_threshold", max(0, self.breaker_threshold))
        fix("breaker_cooloff", self.breaker_cooloff if self.breaker_cooloff > 0
            else BREAKER_COOLOFF)
        fix("headers", tuple((str(k), str(v)) for k, v in self.headers))

    @property
    def flow_controlled(self) -> bool:
        """Whether its callbacks are limited or paused (dq/storage/lua/claim.lua)."""
        return self.paused or self.rate_limit > 0 or self.concurrency > 0


@dataclass(frozen=True)
class ShardConf:
    """One `dq_redis` row; `url` is always a URL dq/sharding/shardurl.py takes (redis://, rediss://,
    unix://, redis+sentinel://). Its name, not its URL, is the shard's identity, so a row
    keeps its jobs' routing when its URL changes (a move onto Sentinel)."""

    id: int
    name: str
    url: str
    enabled: bool = True


@dataclass(frozen=True)
class AlertConf:
    """SMTP settings for alert mail; `tls` is '', 'starttls' or 'ssl'."""

    host: str = ""
    port: int = 0
    user: str = ""
    password: str = ""
    tls: str = ""
    sender: str = ""
    redis_emails: tuple[str, ...] = ()  # who hears that a Redis shard is down
    ext: str = ""


# What each field of a topic means, as the API and the console take it (status is the
# `online` flag). With Topic()'s defaults this is the one definition of a new topic: the
# console's form starts from it, the API schema and README's table (python -m dq.docs) show it.
TOPIC_HELP: dict[str, str] = {
    "topic": "the key clients send: 1 to 64 of A-Z a-z 0-9 _ . - (fixed once created)",
    "name": "what the topic is for (empty: the key)",
    "delay": "seconds after its add a job falls due when the add gives no delay or fix_time",
    "callback": "the http:// or https:// URL called when a job is due (required)",
    "method": "GET: the body's fields go in the URL's query string; POST: as body_format says",
    "timeout_ms": "milliseconds a callback may take, 1 to 60000",
    "emails": "who is mailed when a job of the topic becomes a dead letter",
    "retry_when": "an expression on the reply; a 2xx reply for which it is true counts as a "
                  "failure, e.g. {res.code}!=0 (empty: none)",
    "priority": "1 high, 2 normal, 3 low",
    "status": "online, or offline: adds are refused",
    "max_attempts": "callbacks made before a job becomes a dead letter, 0 to 100; 0 = the "
                    f"server's max_attempts setting (default {Settings.max_attempts})",
    "secret": "signs every callback (X-Dq-Signature); never shown again (empty: unsigned)",
    "body_format": "how a POST sends the fields: form (as php-delayqueue did), json, or query "
                   "(in the URL, with an empty body)",
    "creator": "who owns the topic",
    "rate_limit": f"callbacks per second at most, across every dq instance, with a burst of "
                  f"a tenth of a second's worth (at least 1), 0 to {MAX_RATE}; 0 = no limit",
    "concurrency": f"callbacks in flight at once at most, across every dq instance, 0 to "
                   f"{MAX_CONCURRENCY}; 0 = no limit",
    "paused": "true: adds are taken and kept, and nothing is called until it is resumed "
              "(unlike offline, which refuses adds)",
    "retry_policy": "the wait after a failed attempt: linear = (2n+1) x the retry_unit "
                    "setting (php-delayqueue's 1, 3, 5, 7 minutes; linear:30s for another "
                    "unit), exp:BASE,FACTOR,CAP (exp:30s,2,1h: 30s, 1m, 2m ... at most 1h) or "
                    "list:1m,5m,30m,2h (the last wait repeats); a 429 or 503 reply with "
                    "Retry-After waits that long instead (at most the retry_after_max setting) "
                    "and uses no attempt",
    "breaker_threshold": "failed callbacks in a row that open the topic's circuit breaker: "
                         "its jobs then wait, using no attempts, until one probe after "
                         "breaker_cooloff succeeds; opening and closing mail the emails once "
                         "each. 0 to 1000; 0 = no breaker",
    "breaker_cooloff": "seconds an open breaker waits before it sends one probe, 1 to 86400",
    "headers": "fixed request headers sent with every callback, e.g. {\"Authorization\": "
               "\"Bearer ...\"} (or Name: value lines); values are shown as *** (sending *** "
               "keeps the stored value); Host, Content-*, Connection, User-Agent, X-Dq-* ... are "
               "refused (empty: none)",
}


def topic_values(t: Topic) -> dict[str, Any]:
    """A topic as input values, the shape the API and the console's form take."""
    return {"topic": t.topic, "name": t.name, "delay": t.delay, "callback": t.callback,
            "method": t.method, "timeout_ms": t.timeout_ms, "emails": ", ".join(t.emails),
            "retry_when": t.retry_when, "priority": t.priority,
            "status": "online" if t.online else "offline", "max_attempts": t.max_attempts,
            "secret": "", "body_format": t.body_format, "creator": t.creator,
            "rate_limit": t.rate_limit, "concurrency": t.concurrency, "paused": t.paused,
            "retry_policy": t.retry_policy, "breaker_threshold": t.breaker_threshold,
            "breaker_cooloff": t.breaker_cooloff, "headers": hdr.masked_text(t.headers)}


def normalise_redis_url(text: str) -> str:
    """A shard URL from either a URL (dq/sharding/shardurl.py: redis://, rediss://, unix://,
    redis+sentinel://) or the original's `host:port[:auth][,slave...]` form.

    The slave part of the original form is ignored. Raises ValueError for text that is
    neither.
    """
    text = text.strip()
    if "://" in text:
        shardurl.parse(text)  # ValueError saying what to write
        return text
    host, _, rest = text.split(",", 1)[0].strip().partition(":")
    port, _, auth = rest.partition(":")
    host, port, auth = host.strip(), port.strip() or "6379", auth.strip()
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not a redis URL nor host:port[:password]")
    cred = f":{quote(auth, safe='')}@" if auth else ""
    return f"redis://{cred}{host}:{port}/0"


def _topic_of(row: TopicRow) -> Topic:
    return Topic(
        id=row.id, topic=row.topic, name=row.t_name, delay=row.delay, callback=row.callback,
        method=row.method, timeout_ms=row.timeout, emails=_split_list(row.email),
        retry_when=row.re_notify_flag, priority=row.priority, online=row.status == 1,
        max_attempts=row.max_attempts, secret=row.secret, body_format=row.body_format,
        creator=row.createor, rate_limit=row.rate_limit, concurrency=row.concurrency,
        paused=row.paused == 1,
        retry_policy=row.retry_policy,
        breaker_threshold=row.breaker_threshold, breaker_cooloff=row.breaker_cooloff,
        headers=hdr.loads(row.headers),
    )


def _fill_topic(row: TopicRow, t: Topic) -> None:
    row.topic, row.t_name, row.delay, row.callback = t.topic, t.name, t.delay, t.callback
    row.method, row.timeout, row.email = t.method, t.timeout_ms, ",".join(t.emails)
    row.re_notify_flag, row.priority = t.retry_when, t.priority
    row.status = 1 if t.online else OFFLINE
    row.max_attempts, row.secret, row.body_format = t.max_attempts, t.secret, t.body_format
    row.rate_limit, row.concurrency, row.paused = t.rate_limit, t.concurrency, int(t.paused)
    row.retry_policy, row.breaker_threshold = t.retry_policy, t.breaker_threshold
    row.breaker_cooloff, row.headers = t.breaker_cooloff, hdr.dumps(t.headers)
    row.createor, row.updated_at = t.creator, _now()


def make_engine(url: str) -> sa.Engine:
    """An engine for a SQLite or MySQL/MariaDB URL, tuned for many short transactions."""
    u = sa.make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(u, connect_args={"check_same_thread": False, "timeout": 10})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # MySQL has CRC32() built in; fingerprint() needs it on SQLite too.
            dbapi_conn.create_function(
                "crc32", 1, lambda t: None if t is None else zlib.crc32(t.encode()),
                deterministic=True)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

        return engine
    if backend in _MYSQL:
        if "+" not in u.drivername:
            u = u.set(drivername=f"{backend}+pymysql")
        if "charset" not in u.query:
            u = u.update_query_dict({"charset": "utf8mb4"})
        return sa.create_engine(u, pool_pre_ping=True, pool_recycle=3600)
    raise ValueError(f"registry URL {u.render_as_string()!r}: use sqlite:///path or "
                     "mysql+pymysql://user:password@host/db")


def _add_missing_columns(engine: sa.Engine) -> None:
    inspector = sa.inspect(engine)
    prep = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"].lower() for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name.lower() in have:
                    continue
                spec = sa.schema.CreateColumn(column).compile(dialect=engine.dialect)
                log.warning("registry: adding column %s.%s to an older table",
                            table.name, column.name)
                # DDL takes no bound parameters; every name here is one of our constants.
                conn.exec_driver_sql(f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {spec}")
        _repair_query_topics(conn)


def _repair_query_topics(conn: sa.Connection) -> None:
    """The original sent a POST's fields as a form body (DqModule::send_http_request ->
    DqCurl::add_post_field), so its topics get the column default 'form'. dq up to 0.3
    marked them 'query' when it added the column: rows it marked then and that nobody has
    saved since (dq's own saves set updated_at) are put right. A read first, so that a
    start takes no write lock when there is nothing to repair."""
    t = TopicRow
    marked = sa.and_(t.body_format == "query", t.updated_at.is_(None))
    if not conn.scalar(sa.select(sa.func.count()).select_from(t).where(marked)):
        return
    fixed = conn.execute(sa.update(t).where(marked).values(body_format="form")).rowcount
    log.warning("registry: %d topic(s) that an earlier dq upgrade set to body_format 'query' "
                "send their POST fields as a form body again, as php-delayqueue did", fixed)


def create_tables(engine: sa.Engine) -> None:
    """Create missing tables and add our columns to older php-delayqueue tables.

    Idempotent, and safe when several processes start at once.
    """
    for attempt in range(3):
        try:
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except sa.exc.DBAPIError:
            # Another process may have created the table or column between check and DDL.
            if attempt == 2:
                raise
            log.info("registry: schema update raced another process; retrying")
            time.sleep(0.2 * (attempt + 1))


_R = TypeVar("_R", TopicRow, RedisRow)


def _latest(s: sa.orm.Session, model: type[_R], column: Any, value: str) -> list[_R]:
    """Rows whose `column` is exactly `value`, highest id first.

    The exact re-check matters on old MySQL tables, whose collation is case-insensitive.
    """
    rows = s.scalars(sa.select(model).where(column == value).order_by(model.id.desc()))
    return [r for r in rows if getattr(r, column.key) == value]


class Registry:
    """Synchronous access to the registry tables; workers call it via asyncio.to_thread."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        create_tables(self.engine)
        self._session = sa.orm.sessionmaker(self.engine, expire_on_commit=False)
        self._stat_lock_made = False  # the exporters' lock row exists (export_stats)

    def close(self) -> None:
        self.engine.dispose()

    # topics

    def topics(self) -> dict[str, Topic]:
        """Every topic by key; of rows sharing a key the highest id wins."""
        with self._session() as s:
            rows = s.scalars(sa.select(TopicRow).order_by(TopicRow.id))
            return {row.topic: _topic_of(row) for row in rows}

    def get_topic(self, key: str) -> Topic | None:
        with self._session() as s:
            rows = _latest(s, TopicRow, TopicRow.topic, key)
            return _topic_of(rows[0]) if rows else None

    def save_topic(self, topic: Topic) -> Topic:
        """Insert the topic, or update the row holding its key; returns it as saved."""
        if not topic.topic.strip():
            raise ValueError("a topic needs a non-empty topic key")
        with self._session.begin() as s:
            rows = _latest(s, TopicRow, TopicRow.topic, topic.topic)
            row = rows[0] if rows else TopicRow()
            _fill_topic(row, topic)
            s.add(row)
            s.flush()
            return _topic_of(row)

    def delete_topic(self, key: str) -> bool:
        """Delete every row with this key; False when there was none."""
        with self._session.begin() as s:
            rows = _latest(s, TopicRow, TopicRow.topic, key)
            for row in rows:
                s.delete(row)
            return bool(rows)

    def fingerprint(self) -> str:
        """A value that changes whenever any topic row is added, changed or deleted.

        One aggregate query, so rows written by the original console (which never sets
        updated_at) are noticed too.
        """
        t = TopicRow
        sep = sa.literal("\x1f", sa.String)
        # Casting every column, text too, gives MySQL one charset to concatenate even when
        # an old utf8 table gained utf8mb4 columns.
        cols: list[sa.ColumnElement[str]] = [
            sa.cast(c, sa.String) for c in t.__table__.c if c.name != "updated_at"]
        row_text = reduce(lambda a, b: a + sep + b, cols)
        query = sa.select(sa.func.count(), sa.func.max(t.id), sa.func.sum(sa.func.crc32(row_text)))
        with self.engine.connect() as conn:
            count, max_id, checksum = conn.execute(query).one()
        return f"{count}:{max_id or 0}:{checksum or 0}"

    # shards

    def shards(self) -> list[ShardConf]:
        """Every shard row by id, enabled or not; rows with unusable content are skipped."""
        out = []
        with self._session() as s:
            for row in s.scalars(sa.select(RedisRow).order_by(RedisRow.id)):
                try:
                    url = normalise_redis_url(row.t_content)
                except ValueError:
                    log.warning("registry: dq_redis row %d (%r) has no usable address; "
                                "skipped", row.id, row.t_name)
                    continue
                out.append(ShardConf(row.id, row.t_name, url, row.status == 1))
        return out

    def save_shard(self, name: str, url: str, *, enabled: bool = True) -> ShardConf:
        """Insert a shard, or update the one with this name; `url` is stored as given."""
        if not name.strip():
            raise ValueError("a shard needs a name")
        normalised = normalise_redis_url(url)
        with self._session.begin() as s:
            rows = _latest(s, RedisRow, RedisRow.t_name, name)
            row = rows[0] if rows else RedisRow(t_name=name)
            row.t_content, row.status = url.strip(), 1 if enabled else 0
            s.add(row)
            s.flush()
            return ShardConf(row.id, row.t_name, normalised, enabled)

    def delete_shard(self, id: int) -> bool:
        with self._session.begin() as s:
            row = s.get(RedisRow, id)
            if row is None:
                return False
            s.delete(row)
            return True

    # alert settings: the highest-id row, as the original's mailer reads it

    def alert(self) -> AlertConf:
        """The alert settings; empty ones when none are stored."""
        with self._session() as s:
            row = s.scalars(sa.select(AlertRow).order_by(AlertRow.id.desc()).limit(1)).first()
            if row is None:
                return AlertConf()
            redis_emails = _split_list(row.redis_emails) or _ext_redis_emails(row.ext)
            tls = row.tls.strip().lower()
            return AlertConf(host=row.host, port=row.port, user=row.user, password=row.pwd,
                             tls=tls if tls in ("starttls", "ssl") else "",
                             sender=row.sender, redis_emails=redis_emails, ext=row.ext)

    def save_alert(self, conf: AlertConf) -> None:
        if conf.tls not in ("", "starttls", "ssl"):
            raise ValueError("tls is '', 'starttls' or 'ssl'")
        with self._session.begin() as s:
            row = s.scalars(sa.select(AlertRow).order_by(AlertRow.id.desc()).limit(1)).first()
            row = row or AlertRow()
            row.host, row.port, row.user, row.pwd = conf.host, conf.port, conf.user, conf.password
            row.tls, row.sender, row.ext = conf.tls, conf.sender, conf.ext
            row.redis_emails = ",".join(_split_list(conf.redis_emails))
            s.add(row)

    # counters

    def stat_incr(self, key: str, n: int = 1) -> None:
        """Add n to the counter `key`, creating it at n."""
        now = _now()
        values = {"u_key": key, "num": n, "create_time": now, "update_time": now}
        stmt: Any
        if self.engine.dialect.name in _MYSQL:
            stmt = mysql_insert(StatRow).values(values)
            stmt = stmt.on_duplicate_key_update(num=StatRow.num + n, update_time=now)
        else:
            stmt = sqlite_insert(StatRow).values(values).on_conflict_do_update(
                index_elements=[StatRow.u_key], set_={"num": StatRow.num + n, "update_time": now})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def export_stats(self, counters: Iterable[tuple[str, str, int, tuple[str, ...]]], *,
                     oldest_day: str = "") -> dict[str, int]:
        """Add to dq_stat what each counter gained since its last export, in one
        transaction (no SQL per job). A counter is (mark, day YYYYMMDD or '', its value
        now, the dq_stat keys its gain goes to); its mark (dq_stat_mark) keeps the value
        exported. Exporters take turns on a lock row, and a mark never goes down, so
        several dq instances exporting at once never count a gain twice (one that read a
        value older than the mark adds nothing). Marks of days before `oldest_day` are
        dropped. Returns what was added, per dq_stat key."""
        counters = list(counters)
        for attempt in range(4):
            try:
                return self._export_stats(counters, oldest_day)
            except sa.exc.OperationalError as exc:
                # MySQL: a deadlock (1213) or lock wait timeout (1205) rolled it back whole
                code = getattr(exc.orig, "args", (0,))[0]
                if code not in (1205, 1213) or attempt == 3:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _export_stats(self, counters: list[tuple[str, str, int, tuple[str, ...]]],
                      oldest_day: str) -> dict[str, int]:
        now = _now()
        add: dict[str, int] = {}
        marks: list[dict[str, Any]] = []
        if not self._stat_lock_made:
            # Made on its own, and only when missing: an insert beside exports deadlocks.
            with self.engine.connect() as conn:
                made = conn.scalar(sa.select(sa.func.count()).where(
                    StatMarkRow.mark == STAT_LOCK))
            if not made:
                with self.engine.begin() as conn:
                    self._upsert(conn, StatMarkRow, StatMarkRow.mark, [
                        {"mark": STAT_LOCK, "num": 0, "day": "", "update_time": now}], {})
            self._stat_lock_made = True
        with self.engine.begin() as conn:
            # Exporters take turns here; the marks are read after, so as the last one left them.
            conn.execute(sa.update(StatMarkRow).where(StatMarkRow.mark == STAT_LOCK)
                         .values(num=StatMarkRow.num + 1))
            have = dict(conn.execute(sa.select(StatMarkRow.mark, StatMarkRow.num)
                                     .where(StatMarkRow.mark != STAT_LOCK)).all())
            for mark, day, value, keys in counters:
                old = have.get(mark, 0)
                if value <= old:
                    continue
                for key in keys:
                    add[key] = add.get(key, 0) + value - old
                marks.append({"mark": mark, "num": value, "day": day, "update_time": now})
            if marks:
                self._upsert(conn, StatMarkRow, StatMarkRow.mark, marks,
                             {"num": "replace", "update_time": "replace"})
            if add:
                rows = [{"u_key": k, "num": n, "create_time": now, "update_time": now}
                        for k, n in add.items()]
                self._upsert(conn, StatRow, StatRow.u_key, rows,
                             {"num": "add", "update_time": "replace"})
            if oldest_day:
                conn.execute(sa.delete(StatMarkRow).where(StatMarkRow.day != "",
                                                          StatMarkRow.day < oldest_day))
        return add

    def _upsert(self, conn: sa.Connection, model: type[Base], key: Any,
                rows: list[dict[str, Any]], how: dict[str, str]) -> None:
        """Insert rows, or update the row with the same unique `key`: each column in `how`
        is replaced by the new value or has it added; none: the old row is kept."""
        table: Any = model.__table__
        stmt: Any
        if self.engine.dialect.name in _MYSQL:
            stmt = mysql_insert(table)
            new: Any = stmt.inserted
            sets = {c: (table.c[c] + new[c] if op == "add" else new[c]) for c, op in how.items()}
            stmt = stmt.on_duplicate_key_update(sets or {key.key: table.c[key.key]})
        else:
            stmt = sqlite_insert(table)
            new = stmt.excluded
            sets = {c: (table.c[c] + new[c] if op == "add" else new[c]) for c, op in how.items()}
            stmt = (stmt.on_conflict_do_update(index_elements=[key.key], set_=sets) if sets
                    else stmt.on_conflict_do_nothing(index_elements=[key.key]))
        conn.execute(stmt, rows)

    def stat_get(self, key: str) -> int:
        with self.engine.connect() as conn:
            num = conn.scalar(sa.select(StatRow.num).where(StatRow.u_key == key))
        return int(num or 0)


def _ext_redis_emails(ext: str) -> tuple[str, ...]:
    """The original keeps Redis-down recipients in ext as JSON: {"redis": "a@x,b@y"}."""
    try:
        value = json.loads(ext).get("redis", "")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return ()
    return _split_list(value) if isinstance(value, str) else ()
