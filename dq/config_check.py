"""What a set of settings must satisfy: `validate` refuses, with a ConfigError saying what to
write instead, what dq could not run with (dq/config.py's `load_settings` calls it last).

The checks run in a fixed order (ports, counts and durations; formats; addresses; storage;
the console; the time zone) and the first one that fails is the one reported.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dq.errors import ConfigError
from dq.sharding import clusterurl, shardurl

if TYPE_CHECKING:
    from dq.config import Settings

# Seconds: an add wakes a sleeping timer only for a job due within this (dq/storage/lua/add.lua), so
# no timer may sleep longer than this between looks at its buckets (timer_tick).
WAKE_WITHIN = 60.0

_COUNTS = ("servers", "timers", "consumers", "concurrency", "buckets", "max_attempts")


def validate(s: Settings) -> Settings:
    """`s` when dq can run with it; else ConfigError for the first problem found."""
    _check_numbers(s)
    _check_formats(s)
    _check_addresses(s)
    _check_storage(s)
    _check_console(s)
    _check_timezone(s)
    return s


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_numbers(s: Settings) -> None:
    """Ports, process counts and every duration."""
    _need(0 <= s.port <= 65535, f"port {s.port} is out of range 0..65535")
    _need(0 <= s.web_port <= 65535, f"web_port {s.web_port} is out of range 0..65535")
    for name in _COUNTS:
        _need(getattr(s, name) >= 1, f"{name} must be at least 1 (got {getattr(s, name)})")
    _need(s.retry_unit > 0, "retry_unit must be a positive number of seconds")
    _need(s.retry_after_max >= 1, "retry_after_max must be at least 1 second")
    _need(s.lease > 0, "lease must be a positive number of seconds")
    _need(s.redis_timeout > 0, "redis_timeout must be a positive number of seconds")
    _need(0 <= s.add_timeout <= s.redis_timeout, f"add_timeout must be 0 (off) or a number of "
          f"seconds up to redis_timeout ({s.redis_timeout:g}); php-delayqueue's PHP client "
          f"waits 1 s for a reply, so keep it under 0.5 (got {s.add_timeout:g})")
    _need(s.idle_timeout >= 0, "idle_timeout must be 0 (never close a quiet connection) or a "
          "positive number of seconds")
    _need(s.grace >= 0, "grace must be 0 or more seconds")
    # children beat every second (dq/runtime/context.py HEARTBEAT_EVERY)
    _need(s.heartbeat_timeout >= 2, "heartbeat_timeout must be at least 2 seconds (children "
          "beat every second; a shorter one aborts healthy children)")
    # dq/storage/lua/add.lua wakes a timer only for jobs due within WAKE_WITHIN: a timer must
    # look at its buckets at least that often on its own.
    _need(0 < s.timer_tick <= WAKE_WITHIN, f"timer_tick must be more than 0 and at most "
          f"{WAKE_WITHIN:g} seconds (got {s.timer_tick:g})")


def _check_formats(s: Settings) -> None:
    _need(64 <= s.max_frame <= 9999, "max_frame must be between 64 and 9999 bytes")
    _need(len(s.priority_weights) == 3 and all(w >= 0 for w in s.priority_weights)
          and sum(s.priority_weights) > 0,
          "priority_weights takes three non-negative numbers for priorities 1,2,3, e.g. 5,3,2")
    _need(s.log_format in ("text", "json"), "log_format is 'text' or 'json'")


def _check_addresses(s: Settings) -> None:
    """The callback ranges and the shard URLs."""
    for name in ("callback_deny", "callback_allow"):
        for item in getattr(s, name):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR range; "
                                  "write e.g. 10.0.0.0/8, 127.0.0.1 or fd00::/8") from None
    for url in s.redis:
        try:
            shardurl.parse(url)  # a cluster URL by dq/sharding/clusterurl.py
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check_storage(s: Settings) -> None:
    _need(1 <= s.cluster_partitions <= clusterurl.MAX_PARTITIONS,
          f"cluster_partitions must be 1 to {clusterurl.MAX_PARTITIONS} (got "
          f"{s.cluster_partitions}); pick it once, before the cluster holds jobs")
    _need(0 <= s.replica_acks <= 16, f"replica_acks is how many replicas must have a write "
          f"before it is answered: 0 (do not wait) to 16 (got {s.replica_acks})")
    if s.db:
        why = db_url_problem(s.db)
        _need(not why, f"db is not a valid SQLAlchemy URL ({why}); write it as "
              "dialect+driver://user:password@host[:port]/database, e.g. "
              "mysql+pymysql://user:pass@host/dq or sqlite:///path/to/dq.sqlite3")


def _check_console(s: Settings) -> None:
    # Without a password the console trusts whoever reaches it: that may only be this machine.
    _need(not s.web or bool(s.web_password) or not s.web_host or is_loopback(s.web_host),
          f"web_host {s.web_host!r} without a web_password would open the console and its "
          "admin API to anyone who can reach it: set web_password (DQ_WEB_PASSWORD, "
          "--web-password), or bind web_host 127.0.0.1, or turn the console off (--no-web)")


def _check_timezone(s: Settings) -> None:
    if s.timezone:
        try:
            ZoneInfo(s.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone {s.timezone!r} is not a known IANA zone, "
                              "e.g. Asia/Shanghai or UTC") from None


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine: localhost, 127.0.0.0/8 or ::1."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# The URL grammar of SQLAlchemy's make_url (sqlalchemy/engine/url.py, _parse_url), copied
# so that the master, which must not import SQLAlchemy (0.3 s, 24 MB, and its children would
# inherit that copy across a reload), refuses what make_url would (tests/test_config.py
# checks that the two agree).
_SQLA_URL = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)


def db_url_problem(url: str) -> str:
    """Why sqlalchemy.engine.make_url would refuse `url` ('' when it would not). The
    message leaves the URL out: it may hold a password."""
    m = _SQLA_URL.match(url)
    if m is None:
        return "it does not start with dialect+driver://"
    port = m.group("port")
    if port is not None:
        try:
            int(port)
        except ValueError:
            return f"port {port!r} is not a number"
    return ""
