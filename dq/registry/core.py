"""The registry: topics, Redis shards, alert settings and counters, kept in SQL.

`Registry` is the API; it takes and returns the plain values of dq/registry/values.py
(Topic, ShardConf, AlertConf), re-exported here. The tables are dq/registry/models.py, the
schema and its upgrades dq/registry/schema.py. Only dq/registry knows SQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import reduce
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dq.registry.models import (
    MYSQL_DIALECTS,
    STAT_LOCK,
    AlertRow,
    Base,
    RedisRow,
    StatMarkRow,
    StatRow,
    TopicRow,
    alert_of_row,
    fill_topic_row,
    topic_of_row,
    utc_now,
)
from dq.registry.schema import create_tables, make_engine
from dq.registry.values import AlertConf, ShardConf, Topic, normalise_redis_url, split_list

__all__ = ["AlertConf", "Registry", "ShardConf", "Topic"]

log = logging.getLogger("dq.registry")


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
            return {row.topic: topic_of_row(row) for row in rows}

    def get_topic(self, key: str) -> Topic | None:
        with self._session() as s:
            rows = _latest(s, TopicRow, TopicRow.topic, key)
            return topic_of_row(rows[0]) if rows else None

    def save_topic(self, topic: Topic) -> Topic:
        """Insert the topic, or update the row holding its key; returns it as saved."""
        if not topic.topic.strip():
            raise ValueError("a topic needs a non-empty topic key")
        with self._session.begin() as s:
            rows = _latest(s, TopicRow, TopicRow.topic, topic.topic)
            row = rows[0] if rows else TopicRow()
            fill_topic_row(row, topic)
            s.add(row)
            s.flush()
            return topic_of_row(row)

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
            return AlertConf() if row is None else alert_of_row(row)

    def save_alert(self, conf: AlertConf) -> None:
        if conf.tls not in ("", "starttls", "ssl"):
            raise ValueError("tls is '', 'starttls' or 'ssl'")
        with self._session.begin() as s:
            row = s.scalars(sa.select(AlertRow).order_by(AlertRow.id.desc()).limit(1)).first()
            row = row or AlertRow()
            row.host, row.port, row.user, row.pwd = conf.host, conf.port, conf.user, conf.password
            row.tls, row.sender, row.ext = conf.tls, conf.sender, conf.ext
            row.redis_emails = ",".join(split_list(conf.redis_emails))
            s.add(row)

    # counters

    def stat_incr(self, key: str, n: int = 1) -> None:
        """Add n to the counter `key`, creating it at n."""
        now = utc_now()
        values = {"u_key": key, "num": n, "create_time": now, "update_time": now}
        stmt: Any
        if self.engine.dialect.name in MYSQL_DIALECTS:
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
        now = utc_now()
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
        if self.engine.dialect.name in MYSQL_DIALECTS:
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
