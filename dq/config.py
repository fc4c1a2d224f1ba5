"""Settings: defaults < dq.toml < DQ_* environment < CLI flags.

`Settings` is frozen; build one with `load_settings()`. Every field can be set in the
TOML file under its own name, in the environment as `DQ_<NAME>` (upper case; lists are
comma-separated), or by the caller's overrides (the CLI's flags).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dq.errors import ConfigError

# Seconds: an add wakes a sleeping timer only for a job due within this (dq/lua/add.lua), so
# no timer may sleep longer than this between looks at its buckets (timer_tick).
WAKE_WITHIN = 60.0

@dataclass(frozen=True)
class Settings:
    """Everything a dq process needs to know, read once at start (and on reload)."""

    # TCP server
    host: str = "0.0.0.0"
    port: int = 6789
    servers: int = 1
    max_connections: int = 2000
    # seconds a connection may stay quiet before it is closed; 0 = never, as the original
    # did: its PHP client keeps one connection for the life of its process and never
    # reconnects, so closing it would fail every later add of that process
    idle_timeout: float = 0.0
    max_frame: int = 9999  # bytes of JSON in one frame; the 4-digit prefix caps it at 9999
    # storage
    redis: tuple[str, ...] = ()  # shard URLs; empty = embedded redis-server
    db: str = ""  # SQLAlchemy URL; empty = SQLite in the data dir
    data_dir: str = "./var"
    prefix: str = "dq:"
    buckets: int = 8  # delay zsets per shard; timers share them out
    # delivery
    timers: int = 2
    consumers: int = 2
    concurrency: int = 64  # callbacks in flight per consumer
    retry_unit: float = 60.0  # seconds; attempt n is retried at +(2n+1) units
    max_attempts: int = 10
    lease: float = 60.0  # seconds a claimed job may stay in flight before it is requeued
    priority_weights: tuple[int, ...] = (5, 3, 2)
    timer_tick: float = 1.0  # longest a timer sleeps when nothing is due (<= WAKE_WITHIN)
    timezone: str = ""  # zone of `fix_time`; empty = this machine's local zone
    registry_refresh: float = 2.0  # seconds between registry polls in workers
    # web console
    web_host: str = ""  # empty = 0.0.0.0 with a password, 127.0.0.1 without
    web_port: int = 8088
    web: bool = True
    web_password: str = ""
    metrics_public: bool = False
    # supervision and logs
    grace: float = 30.0
    heartbeat_timeout: float = 30.0
    checker_interval: float = 1.0
    shard_down_after: float = 10.0
    redis_timeout: float = 5.0  # seconds a shard may leave commands unanswered: then failed
    log_dir: str = ""
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    daemon: bool = False
    pid_file: str = ""
    config_file: str = field(default="", compare=False)

    @property
    def zone(self) -> ZoneInfo | None:
        """The zone `fix_time` is read in; None means the local zone."""
        if not self.timezone:
            return None
        return ZoneInfo(self.timezone)

    @property
    def embedded(self) -> bool:
        return not self.redis

    def db_url(self) -> str:
        if self.db:
            return self.db
        return f"sqlite:///{Path(self.data_dir).resolve() / 'dq.sqlite3'}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_HINTS = get_type_hints(Settings)
_FIELDS = {f.name for f in fields(Settings)}


def _coerce(name: str, value: Any, source: str = "") -> Any:
    """Turn a TOML or environment value into the field's type, or say what is wrong (and,
    given its `source`, where it was set)."""
    hint = _HINTS[name]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if hint == tuple[str, ...]:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if hint == tuple[int, ...]:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items)
    except (TypeError, ValueError):
        where = f" (from {source})" if source else ""
        raise ConfigError(
            f"setting {name!r}{where}: {value!r} is not a valid "
            f"{getattr(hint, '__name__', hint)}"
        ) from None
    raise ConfigError(f"setting {name!r} has an unsupported type")  # pragma: no cover


def _validate(s: Settings) -> Settings:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(0 <= s.port <= 65535, f"port {s.port} is out of range 0..65535")
    need(0 <= s.web_port <= 65535, f"web_port {s.web_port} is out of range 0..65535")
    for name in ("servers", "timers", "consumers", "concurrency", "buckets", "max_attempts"):
        need(getattr(s, name) >= 1, f"{name} must be at least 1 (got {getattr(s, name)})")
    need(s.retry_unit > 0, "retry_unit must be a positive number of seconds")
    need(s.lease > 0, "lease must be a positive number of seconds")
    need(s.redis_timeout > 0, "redis_timeout must be a positive number of seconds")
    need(s.idle_timeout >= 0, "idle_timeout must be 0 (never close a quiet connection) or a "
         "positive number of seconds")
    need(s.grace >= 0, "grace must be 0 or more seconds")
    # children beat every second (dq/worker.py HEARTBEAT_EVERY)
    need(s.heartbeat_timeout >= 2, "heartbeat_timeout must be at least 2 seconds (children "
         "beat every second; a shorter one aborts healthy children)")
    # dq/lua/add.lua wakes a timer only for jobs due within WAKE_WITHIN: a timer must look
    # at its buckets at least that often on its own.
    need(0 < s.timer_tick <= WAKE_WITHIN, f"timer_tick must be more than 0 and at most "
         f"{WAKE_WITHIN:g} seconds (got {s.timer_tick:g})")
    need(64 <= s.max_frame <= 9999, "max_frame must be between 64 and 9999 bytes")
    need(len(s.priority_weights) == 3 and all(w >= 0 for w in s.priority_weights)
         and sum(s.priority_weights) > 0,
         "priority_weights takes three non-negative numbers for priorities 1,2,3, e.g. 5,3,2")
    need(s.log_format in ("text", "json"), "log_format is 'text' or 'json'")
    for url in s.redis:
        need(url.split("://", 1)[0] in ("redis", "rediss", "unix"),
             f"redis shard {url!r} must be a redis://, rediss:// or unix:// URL")
    if s.db:
        why = db_url_problem(s.db)
        need(not why, f"db is not a valid SQLAlchemy URL ({why}); write it as "
             "dialect+driver://user:password@host[:port]/database, e.g. "
             "mysql+pymysql://user:pass@host/dq or sqlite:///path/to/dq.sqlite3")
    # Without a password the console trusts whoever reaches it: that may only be this machine.
    need(not s.web or bool(s.web_password) or not s.web_host or is_loopback(s.web_host),
         f"web_host {s.web_host!r} without a web_password would open the console and its "
         "admin API to anyone who can reach it: set web_password (DQ_WEB_PASSWORD, "
         "--web-password), or bind web_host 127.0.0.1, or turn the console off (--no-web)")
    if s.timezone:
        try:
            ZoneInfo(s.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone {s.timezone!r} is not a known IANA zone, "
                              "e.g. Asia/Shanghai or UTC") from None
    return s


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


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read the layers in order and return validated settings.

    `overrides` are the CLI's flags (None values are ignored). The config file is
    `config_file`, else `DQ_CONFIG`, else `./dq.toml` when it exists.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or env.get("DQ_CONFIG") or ("dq.toml" if Path("dq.toml").is_file() else "")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data = data.get("dq", data)
        for key, value in data.items():
            if key not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, value, f"config file {path}")
    for name in _FIELDS:
        raw = env.get("DQ_" + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw, "DQ_" + name.upper())
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value)
    values["config_file"] = path
    return _validate(Settings(**values))
