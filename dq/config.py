"""Settings: defaults < dq.toml < DQ_* environment < CLI flags.

`Settings` is frozen; build one with `load_settings()`. Every field can be set in the
TOML file under its own name, in the environment as `DQ_<NAME>` (upper case; lists are
comma-separated), or by the caller's overrides (the CLI's flags). What the settings must
satisfy is checked in dq/config_check.py.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints
from zoneinfo import ZoneInfo

from dq.config_check import WAKE_WITHIN, validate
from dq.errors import ConfigError
from dq.sharding.shardurl import split_shard_urls

TCP, STORAGE, DELIVERY, WEB, SUPERVISION, LOGS, PROCESS = (
    "TCP server", "storage", "delivery", "web console", "supervision", "logs", "process")


def setting(default: Any, help: str, *, group: str, shown: str = "", metavar: str = "",
            choices: tuple[str, ...] = (), compare: bool = True) -> Any:
    """A Settings field with its documentation: `help` says what it does, `group` where
    --help and README list it, `shown` how to read an empty default. `dq-master --help` and
    README's settings table (`python -m dq.docs`) are made from these."""
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

    @property
    def web_bind_host(self) -> str:
        """Where dq-web listens: web_host, else everywhere with a password and loopback
        without."""
        if self.web_host:
            return self.web_host
        return "0.0.0.0" if self.web_password else "127.0.0.1"

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
    return validate(Settings(**values))
