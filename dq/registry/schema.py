"""The registry's engine and schema: create missing tables, bring a php-delayqueue database
(its dq.sql) or an older dq's up to date, and repair what an earlier upgrade got wrong.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from dq.registry.models import MYSQL_DIALECTS, Base, TopicRow

log = logging.getLogger("dq.registry")


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
    if backend in MYSQL_DIALECTS:
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
