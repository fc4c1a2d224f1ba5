"""php-delayqueue's tables as SQLAlchemy models, and how a row becomes a value and back.

Tables and columns are the original's (`dq_topic`, `dq_redis`, `dq_alert`, `dq_stat`) plus
added columns that all have defaults, so an existing php-delayqueue database keeps working
and its console may keep writing rows; `dq_stat_mark` is dq's own.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dq.registry import headers as hdr
from dq.registry.retry_policy import DEFAULT as DEFAULT_POLICY
from dq.registry.values import (
    BREAKER_COOLOFF,
    OFFLINE,
    RETRY_PLACEHOLDER,
    AlertConf,
    Topic,
    split_list,
)

MYSQL_DIALECTS = ("mysql", "mariadb")
_TABLE_ARGS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}
_TINYINT = sa.SmallInteger().with_variant(mysql.TINYINT(), *MYSQL_DIALECTS)


def utc_now() -> datetime:
    """Now in UTC, without a zone (as the DateTime columns hold it)."""
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
        sa.String(255).with_variant(mysql.VARCHAR(255, collation="utf8mb4_bin"), *MYSQL_DIALECTS),
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


def topic_of_row(row: TopicRow) -> Topic:
    """A dq_topic row as workers see it (Topic normalises what other programs wrote)."""
    return Topic(
        id=row.id, topic=row.topic, name=row.t_name, delay=row.delay, callback=row.callback,
        method=row.method, timeout_ms=row.timeout, emails=split_list(row.email),
        retry_when=row.re_notify_flag, priority=row.priority, online=row.status == 1,
        max_attempts=row.max_attempts, secret=row.secret, body_format=row.body_format,
        creator=row.createor, rate_limit=row.rate_limit, concurrency=row.concurrency,
        paused=row.paused == 1,
        retry_policy=row.retry_policy,
        breaker_threshold=row.breaker_threshold, breaker_cooloff=row.breaker_cooloff,
        headers=hdr.loads(row.headers),
    )


def fill_topic_row(row: TopicRow, t: Topic) -> None:
    """Write `t` into `row`, stamping updated_at (dq's saves; the original never set it)."""
    row.topic, row.t_name, row.delay, row.callback = t.topic, t.name, t.delay, t.callback
    row.method, row.timeout, row.email = t.method, t.timeout_ms, ",".join(t.emails)
    row.re_notify_flag, row.priority = t.retry_when, t.priority
    row.status = 1 if t.online else OFFLINE
    row.max_attempts, row.secret, row.body_format = t.max_attempts, t.secret, t.body_format
    row.rate_limit, row.concurrency, row.paused = t.rate_limit, t.concurrency, int(t.paused)
    row.retry_policy, row.breaker_threshold = t.retry_policy, t.breaker_threshold
    row.breaker_cooloff, row.headers = t.breaker_cooloff, hdr.dumps(t.headers)
    row.createor, row.updated_at = t.creator, utc_now()


def alert_of_row(row: AlertRow) -> AlertConf:
    """The alert settings of a dq_alert row."""
    redis_emails = split_list(row.redis_emails) or _ext_redis_emails(row.ext)
    tls = row.tls.strip().lower()
    return AlertConf(host=row.host, port=row.port, user=row.user, password=row.pwd,
                     tls=tls if tls in ("starttls", "ssl") else "",
                     sender=row.sender, redis_emails=redis_emails, ext=row.ext)


def _ext_redis_emails(ext: str) -> tuple[str, ...]:
    """The original keeps Redis-down recipients in ext as JSON: {"redis": "a@x,b@y"}."""
    try:
        value = json.loads(ext).get("redis", "")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return ()
    return split_list(value) if isinstance(value, str) else ()
