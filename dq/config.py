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
from dq.sharding import clusterurl, shardurl
from dq.sharding.shardurl import split_shard_urls

# Seconds: an add wakes a sleeping timer only for a job due within this (dq/storage/lua/add.lua), so
# no timer may sleep longer than this between looks at its buckets (timer_tick).
WAKE_WITHIN = 60.0

TCP, STORAGE, DELIVERY, WEB, SUPERVISION, LOGS, PROCESS = (
    "TCP server", "storage", "delivery", "web console", "supervision", "logs", "process")


def setting(default: Any, help: str, *, group: str, shown: str = "", metavar: str = "",
            choices: tuple[str, ...] = (), compare: bool = True) -> Any:
    """A Settings field with its documentation: `help` says what it does, `group` where
    --help and README list it, `shown` how to read an empty default. `dq-master --help` and
    README's settings table (`python -m dq.config --update-readme`) are made from these."""
    return field(default=default, compare=compare, metadata={
        "help": help, "group": group, "shown": shown, "metavar": metavar, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Everything a dq process needs to know, read once at start (and on reload)."""

    host: str = setting("0.0.0.0", "address the TCP server listens on", group=TCP,
                        metavar="ADDR")
    port: int = setting(6789, "TCP port of the server (add/get/del)", group=TCP,
                        metavar="PORT")
    servers: int = setting(1, "server processes sharing the one port", group=TCP,
                           metavar="N")
    max_connections: int = setting(2000, "client connections one server process holds; "
                                   "more are refused with too_many_connections", group=TCP,
                                   metavar="N")
    # 0 as the original did: its PHP client keeps one connection for the life of its
    # process and never reconnects, so closing it would fail every later add of it
    idle_timeout: float = setting(0.0, "seconds a client connection may stay quiet before it "
                                  "is closed; 0 = never (php-delayqueue's PHP client never "
                                  "reconnects)", group=TCP, metavar="S")
    max_frame: int = setting(9999, "bytes of JSON in one request frame, 64 to 9999 (the "
                             "4-digit length prefix caps it)", group=TCP, metavar="BYTES")
    redis: tuple[str, ...] = setting((), "Redis shards, each redis://host:port/db, rediss://, "
                                     "unix://path, redis+sentinel://host:port[,host:port"
                                     "...]/service_name[/db] (a Sentinel master, followed "
                                     "across failovers) or redis+cluster://host:port[,host:"
                                     "port...] (a whole Redis Cluster, cut into "
                                     "cluster_partitions shards): repeat the flag per shard "
                                     "(comma-separated in DQ_REDIS); the registry's enabled "
                                     "dq_redis shards are added", group=STORAGE,
                                     shown="none: the registry's dq_redis shards, else an "
                                     "embedded redis-server", metavar="URL")
    cluster_partitions: int = setting(16, "shards a redis+cluster:// URL is cut into, each "
                                      "one hash-tagged slot placed on a master by the "
                                      "cluster (1 to 256); chosen once: changing it strands "
                                      "the jobs stored before", group=STORAGE, metavar="N")
    db: str = setting("", "registry database (topics, shards, alert settings), a SQLAlchemy "
                      "URL such as mysql+pymysql://user:pw@host/dq", group=STORAGE,
                      shown="SQLite in the data dir", metavar="URL")
    data_dir: str = setting("./var", "where the embedded Redis, SQLite, heartbeats and "
                            "health.json live", group=STORAGE, metavar="DIR")
    prefix: str = setting("dq:", "prefix of every Redis key dq writes", group=STORAGE,
                          metavar="TEXT")
    buckets: int = setting(8, "delay sorted sets per shard, shared out among the timers "
                           "(more timers than buckets leaves some idle)", group=STORAGE,
                           metavar="N")
    adopt_prefix: str = setting("dq_", "key prefix of php-delayqueue's jobs (its "
                                "DqConf::$prefix), adopted into dq's layout at start and "
                                "every 30 s; empty = none to adopt", group=STORAGE,
                                metavar="TEXT")
    timers: int = setting(2, "timer processes (move due jobs to the ready lists)",
                          group=DELIVERY, metavar="N")
    consumers: int = setting(2, "consumer processes (make the callbacks)", group=DELIVERY,
                             metavar="N")
    concurrency: int = setting(64, "callbacks in flight per consumer", group=DELIVERY,
                               metavar="N")
    retry_unit: float = setting(60.0, "seconds; failed attempt n (0-based) is retried after "
                                "2n+1 units (topics whose retry_policy is linear)",
                                group=DELIVERY, metavar="S")
    retry_after_max: float = setting(3600.0, "seconds at most that a 429 or 503 reply's "
                                     "Retry-After makes a job wait (it uses no attempt)",
                                     group=DELIVERY, metavar="S")
    max_attempts: int = setting(10, "callbacks made before a job becomes a dead letter, for "
                                "topics whose max_attempts is 0", group=DELIVERY, metavar="N")
    lease: float = setting(60.0, "seconds a claimed job may stay in flight; then it is "
                           "delivered again (callbacks are cut off before)", group=DELIVERY,
                           metavar="S")
    priority_weights: tuple[int, ...] = setting((5, 3, 2), "relative odds that a consumer's "
                                                "claim tries priority 1, 2 or 3 first",
                                                group=DELIVERY, metavar="A,B,C")
    timer_tick: float = setting(1.0, f"longest a timer sleeps when nothing is due, in "
                                f"seconds (at most {WAKE_WITHIN:g})", group=DELIVERY,
                                metavar="S")
    timezone: str = setting("", "IANA zone that fix_time, notify_time and the daily "
                            "counters are in, e.g. Asia/Shanghai", group=DELIVERY,
                            shown="this machine's zone", metavar="ZONE")
    registry_refresh: float = setting(2.0, "seconds between looks at the registry for changed "
                                      "topics and shards", group=DELIVERY, metavar="S")
    callback_deny: tuple[str, ...] = setting((), "addresses or CIDR ranges callbacks may not "
                                             "connect to, besides link-local, metadata and "
                                             "dq's own ports, e.g. 10.0.0.0/8: repeat the flag "
                                             "per range (comma-separated in DQ_CALLBACK_DENY)",
                                             group=DELIVERY, shown="none", metavar="CIDR")
    callback_allow: tuple[str, ...] = setting((), "exceptions to the refused callback ranges, "
                                              "never to dq's own ports, e.g. 169.254.10.0/24: "
                                              "repeat the flag per range", group=DELIVERY,
                                              shown="none", metavar="CIDR")
    web_host: str = setting("", "console address; without web_password only a loopback "
                            "address is allowed", group=WEB,
                            shown="0.0.0.0 with a password, else 127.0.0.1", metavar="ADDR")
    web_port: int = setting(8088, "console port", group=WEB, metavar="PORT")
    web: bool = setting(True, "run the console", group=WEB)
    web_password: str = setting("", "password of the console and its API", group=WEB,
                                shown="none", metavar="PW")
    metrics_public: bool = setting(False, "serve /metrics without the console password",
                                   group=WEB)
    grace: float = setting(30.0, "seconds a stop or reload waits for callbacks in flight",
                           group=SUPERVISION, metavar="S")
    heartbeat_timeout: float = setting(30.0, "a child silent this many seconds is aborted "
                                       "and replaced (at least 2)", group=SUPERVISION,
                                       metavar="S")
    checker_interval: float = setting(1.0, "seconds between the checker's pings of every "
                                      "shard", group=SUPERVISION, metavar="S")
    shard_down_after: float = setting(10.0, "seconds a shard must fail before it is marked "
                                      "down (and mailed about)", group=SUPERVISION,
                                      metavar="S")
    replica_acks: int = setting(0, "replicas that must have an add, and every later change "
                                "of a job, before it is answered (Redis WAIT after each "
                                "batch, 150 ms at most; fewer in time: the add is answered "
                                "unavailable, though stored on the master); 1 = an "
                                "acknowledged add survives the loss of its master",
                                group=STORAGE, metavar="N")
    redis_timeout: float = setting(5.0, "seconds a shard may leave commands unanswered "
                                   "before they count as failed", group=SUPERVISION,
                                   metavar="S")
    add_timeout: float = setting(0.4, "seconds of silence from a shard after which an add "
                                 "is written to the next shard instead (or answered "
                                 "unavailable) and the silent one passed over for a while; "
                                 "0 = wait up to redis_timeout", group=SUPERVISION,
                                 metavar="S")
    log_dir: str = setting("", "also write daily request_/notify_/err_/notice_YYYYMMDD.txt "
                           "files here (php-delayqueue's names)", group=LOGS,
                           shown="stderr only (DATA_DIR/log with daemon)", metavar="DIR")
    log_format: str = setting("text", "text or json (one object per line)", group=LOGS,
                              choices=("text", "json"))
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", group=LOGS,
                             metavar="LEVEL")
    daemon: bool = setting(False, "run in the background (logs go to log_dir)",
                           group=PROCESS)
    pid_file: str = setting("", "write the master's pid here", group=PROCESS, shown="none",
                            metavar="PATH")
    config_file: str = setting("", "the TOML config file to read", group=PROCESS,
                               shown="./dq.toml if present", metavar="FILE", compare=False)

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


def flag_name(name: str) -> str:
    """The command-line flag of a setting (`config_file` is `--config`)."""
    return "--config" if name == "config_file" else "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable of a setting (`config_file` is `DQ_CONFIG`)."""
    return "DQ_CONFIG" if name == "config_file" else "DQ_" + name.upper()


def shown_default(f: dataclasses.Field[Any]) -> str:
    """A setting's default as the docs show it."""
    value = f.default
    if f.metadata.get("shown") and value in ("", ()):
        return str(f.metadata["shown"])
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


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
        if hint == tuple[str, ...] and name == "redis" and isinstance(value, str):
            return split_shard_urls(value)  # sentinel and cluster URLs hold commas too
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
    need(s.retry_after_max >= 1, "retry_after_max must be at least 1 second")
    need(s.lease > 0, "lease must be a positive number of seconds")
    need(s.redis_timeout > 0, "redis_timeout must be a positive number of seconds")
    need(0 <= s.add_timeout <= s.redis_timeout, f"add_timeout must be 0 (off) or a number of "
         f"seconds up to redis_timeout ({s.redis_timeout:g}); php-delayqueue's PHP client "
         f"waits 1 s for a reply, so keep it under 0.5 (got {s.add_timeout:g})")
    need(s.idle_timeout >= 0, "idle_timeout must be 0 (never close a quiet connection) or a "
         "positive number of seconds")
    need(s.grace >= 0, "grace must be 0 or more seconds")
    # children beat every second (dq/runtime/context.py HEARTBEAT_EVERY)
    need(s.heartbeat_timeout >= 2, "heartbeat_timeout must be at least 2 seconds (children "
         "beat every second; a shorter one aborts healthy children)")
    # dq/storage/lua/add.lua wakes a timer only for jobs due within WAKE_WITHIN: a timer must look
    # at its buckets at least that often on its own.
    need(0 < s.timer_tick <= WAKE_WITHIN, f"timer_tick must be more than 0 and at most "
         f"{WAKE_WITHIN:g} seconds (got {s.timer_tick:g})")
    need(64 <= s.max_frame <= 9999, "max_frame must be between 64 and 9999 bytes")
    need(len(s.priority_weights) == 3 and all(w >= 0 for w in s.priority_weights)
         and sum(s.priority_weights) > 0,
         "priority_weights takes three non-negative numbers for priorities 1,2,3, e.g. 5,3,2")
    need(s.log_format in ("text", "json"), "log_format is 'text' or 'json'")
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
    need(1 <= s.cluster_partitions <= clusterurl.MAX_PARTITIONS,
         f"cluster_partitions must be 1 to {clusterurl.MAX_PARTITIONS} (got "
         f"{s.cluster_partitions}); pick it once, before the cluster holds jobs")
    need(0 <= s.replica_acks <= 16, f"replica_acks is how many replicas must have a write "
         f"before it is answered: 0 (do not wait) to 16 (got {s.replica_acks})")
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
    for name in _FIELDS - {"config_file"}:  # that one is DQ_CONFIG, read above
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
