"""Validation shared by the API and the HTML forms: topics, shards and alert settings.

Input is a mapping of field -> value, from JSON (typed) or from a form (strings). Every
problem is collected as a field-level message saying what to enter; `Invalid` carries them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from dq.registry import headers as hdr
from dq.registry.retry_expr import PLACEHOLDER, RetryExprError, parse
from dq.registry.retry_policy import RetryPolicyError, normalise
from dq.registry.values import (
    BODY_FORMATS,
    MAX_CONCURRENCY,
    MAX_RATE,
    AlertConf,
    Topic,
    normalise_redis_url,
    topic_values,
)
from dq.roles.netpolicy import CallbackPolicy, judge_url
from dq.sharding import clusterurl, shardurl
from web.errors import Invalid
from web.state import WebState

TOPIC_KEY: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
EMAIL: Final = re.compile(r"[^@\s,;<>\"()\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
                          r"\.[A-Za-z0-9-]{2,}")
TOPIC_FIELDS: Final = ("topic", "name", "delay", "callback", "method", "timeout_ms", "emails",
                       "retry_when", "priority", "status", "max_attempts", "secret",
                       "body_format", "creator", "rate_limit", "concurrency", "paused",
                       "retry_policy", "breaker_threshold", "breaker_cooloff", "headers")
_IGNORED: Final = ("secret_set", "clear_secret", "id", "csrf", "breaker")  # read-only
MAX_DELAY: Final = 10 * 366 * 86400  # ten years of seconds; also fits the INT column
MASK: Final = "***"
RESOLVE_WAIT: Final = 3.0  # seconds a callback's host may take to resolve at registration


class Fields:
    """Reads typed values out of loose input, collecting one message per bad field."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.errors: dict[str, str] = {}

    def fail(self, name: str, msg: str) -> None:
        self.errors.setdefault(name, msg)

    def raw(self, name: str, default: Any) -> Any:
        value = self.data.get(name, default)
        return default if value is None else value

    def text(self, name: str, default: str = "", *, limit: int = 255) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            self.fail(name, f"{name} must be text")
            return default
        value = value.strip()
        if len(value) > limit:
            self.fail(name, f"{name} is {len(value)} characters long; the limit is {limit}")
        elif re.search(r"[\x00-\x1f\x7f]", value):
            self.fail(name, f"{name} must not contain control characters or line breaks")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int, example: str = "") -> int:
        value = self.raw(name, default)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
            value = int(value)
        elif isinstance(value, str) and not value.strip():
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            hint = f", e.g. {example}" if example else ""
            self.fail(name, f"{name} must be a whole number from {lo} to {hi}{hint}")
            return default
        return value

    def choice(self, name: str, default: str, options: tuple[str, ...], *,
               upper: bool = False) -> str:
        value = self.raw(name, default)
        if isinstance(value, str):
            value = value.strip().upper() if upper else value.strip().lower()
        if value not in options:
            self.fail(name, f"{name} must be one of {', '.join(options)}")
            return default
        return str(value)

    def emails(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.raw(name, default)
        if isinstance(value, str):
            items = [p for p in re.split(r"[,;\s]+", value) if p]
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value if v.strip()]
        else:
            self.fail(name, f"{name} must be a list of addresses or one comma-separated text")
            return default
        bad = [a for a in items if not EMAIL.fullmatch(a)]
        if bad:
            shown = ", ".join(repr(a) for a in bad[:3])
            self.fail(name, f"not a valid email address: {shown}; separate several with commas, "
                      "e.g. ops@example.com, dev@example.com")
        elif len(",".join(items)) > 1024:
            self.fail(name, f"{name} is too long; the addresses together may use 1024 characters")
        return tuple(items)

    def boolean(self, name: str, default: bool) -> bool:
        """true/false (JSON), or a form's true/false, yes/no, on/off, 1/0."""
        value = self.raw(name, default)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in ("true", "yes", "on", "1"):
                return True
            if word in ("false", "no", "off", "0", ""):
                return False if word else default
        elif isinstance(value, bool):
            return value
        self.fail(name, f"{name} must be true or false")
        return default

    def flag(self, name: str) -> bool:
        value = self.data.get(name)
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "on", "yes")
        return bool(value)


def check_callback(url: str) -> str:
    """'' when url is an http(s) URL with a host, else what is wrong with it."""
    if not url:
        return "callback is required: the http:// or https:// URL dq calls when a job is due"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "callback is not a valid URL, e.g. https://api.example.com/dq/order-timeout"
    if parts.scheme not in ("http", "https"):
        return "callback must start with http:// or https://"
    if not host:
        return "callback needs a host name, e.g. https://api.example.com/hook"
    if re.search(r"\s", url):
        return "callback must not contain spaces; encode them as %20"
    return ""


async def check_callback_target(st: WebState, url: str) -> None:
    """Invalid when the callback's host already resolves only to addresses the callback
    network policy refuses (dq/roles/netpolicy.py: link-local and metadata addresses, dq's own
    Redis, registry and console ports, `callback_deny`), or is an old numeric spelling of an
    address. A name that does not resolve (yet) passes: each call is judged again."""
    if st.callback_policy is None:
        urls = [s.url for s in st.store.shards.shards]
        st.callback_policy = await asyncio.to_thread(CallbackPolicy.build, st.settings, urls)
    try:
        async with asyncio.timeout(RESOLVE_WAIT):
            why = await asyncio.to_thread(judge_url, st.callback_policy, url)
    except TimeoutError:
        return
    if why:
        raise Invalid({"callback": why})


def check_retry_when(text: str) -> str:
    """'' when the expression parses, else the parser's message with its position."""
    if not text or text == PLACEHOLDER:
        return ""
    try:
        parse(text)
    except RetryExprError as exc:
        hint = f": {exc.hint}" if exc.hint else ""
        return f"{exc.what} at position {exc.position}{hint}"
    return ""


def _unknown(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, str]:
    return {k: f"unknown field; the fields are {', '.join(known)}"
            for k in data if k not in known and k not in _IGNORED}


topic_input = topic_values  # a stored topic as input values (what an edit form starts from)
# A new topic, wherever it is made: the console's form starts from these, and the API and
# the form fill a field left out with them.
NEW_TOPIC: Final = topic_values(Topic())


def topic_json(t: Topic) -> dict[str, Any]:
    """A topic for API replies; the secret and header values are never shown (`breaker`,
    its breaker's state, is filled in by the API where it reads it)."""
    return {"topic": t.topic, "name": t.name, "delay": t.delay, "callback": t.callback,
            "method": t.method, "timeout_ms": t.timeout_ms, "emails": list(t.emails),
            "retry_when": t.retry_when, "priority": t.priority,
            "status": "online" if t.online else "offline", "max_attempts": t.max_attempts,
            "secret": None, "secret_set": bool(t.secret), "body_format": t.body_format,
            "creator": t.creator, "rate_limit": t.rate_limit, "concurrency": t.concurrency,
            "paused": t.paused, "retry_policy": t.retry_policy,
            "breaker_threshold": t.breaker_threshold, "breaker_cooloff": t.breaker_cooloff,
            "headers": hdr.masked(t.headers), "breaker": None}


def validate_topic(data: Mapping[str, Any], *, existing: Topic | None = None,
                   key: str | None = None, creator: str = "") -> Topic:
    """A Topic from input, or Invalid. On update (`existing`), missing fields keep their
    stored values and an empty secret keeps the stored secret (`clear_secret` empties it)."""
    base = topic_input(existing) if existing else {}
    merged = {**base, **{k: v for k, v in data.items() if k in TOPIC_FIELDS and v is not None}}
    f = Fields(merged)
    errors = _unknown(data, TOPIC_FIELDS)
    topic = _topic_key(f, key, existing)
    name = f.text("name", limit=255)
    callback = f.text("callback", limit=1024)
    if problem := check_callback(callback):
        f.fail("callback", problem)
    retry_when = f.text("retry_when", limit=1024)
    if problem := check_retry_when(retry_when):
        f.fail("retry_when", problem)
    secret = f.text("secret", limit=255)
    if not secret and existing is not None and not Fields(data).flag("clear_secret"):
        secret = existing.secret
    policy = _retry_policy(f)
    headers = _headers(f, merged, existing)
    result = Topic(id=existing.id if existing else 0, topic=topic, name=name or topic,
                   callback=callback, retry_when=retry_when, secret=secret,
                   retry_policy=policy, headers=headers, **_topic_settings(f, creator))
    errors.update(f.errors)
    if errors:
        raise Invalid(errors)
    return result


def _topic_key(f: Fields, key: str | None, existing: Topic | None) -> str:
    """The topic key: fixed once created (`key`), and of a safe form when new."""
    topic = f.text("topic")
    if key is not None and topic != key:
        f.fail("topic", f"the topic key cannot be changed (this is {key!r}); create a new "
               "topic instead")
    elif not TOPIC_KEY.fullmatch(topic) and existing is None:
        f.fail("topic", "topic key must be 1 to 64 letters, digits, '_', '.' or '-' "
               "(no ':' or spaces), e.g. order_timeout")
    return topic


def _retry_policy(f: Fields) -> str:
    policy = f.text("retry_policy", NEW_TOPIC["retry_policy"], limit=255)
    try:
        return normalise(policy)
    except RetryPolicyError as exc:
        f.fail("retry_policy", str(exc))
        return policy


def _headers(f: Fields, merged: Mapping[str, Any], existing: Topic | None) -> hdr.Headers:
    try:
        return hdr.parse(merged.get("headers"), existing.headers if existing else ())
    except hdr.HeaderError as exc:
        f.fail("headers", str(exc))
        return ()


def _topic_settings(f: Fields, creator: str) -> dict[str, Any]:
    """The topic's fields that are numbers and choices, each checked against its range (a
    field left out is NEW_TOPIC's), in the order their problems are reported."""
    return dict(
        delay=f.integer("delay", NEW_TOPIC["delay"], 0, MAX_DELAY, "1800 for half an hour"),
        method=f.choice("method", NEW_TOPIC["method"], ("GET", "POST"), upper=True),
        timeout_ms=f.integer("timeout_ms", NEW_TOPIC["timeout_ms"], 1, 60000, "3000"),
        emails=f.emails("emails"),
        priority=f.integer("priority", NEW_TOPIC["priority"], 1, 3, "1 high, 2 normal, 3 low"),
        online=f.choice("status", NEW_TOPIC["status"], ("online", "offline")) == "online",
        max_attempts=f.integer("max_attempts", NEW_TOPIC["max_attempts"], 0, 100,
                               "0 for the server's max_attempts setting"),
        body_format=f.choice("body_format", NEW_TOPIC["body_format"], BODY_FORMATS),
        creator=f.text("creator", creator, limit=255) or creator,
        rate_limit=f.integer("rate_limit", NEW_TOPIC["rate_limit"], 0, MAX_RATE,
                             "40 for 40 callbacks a second, 0 for no limit"),
        concurrency=f.integer("concurrency", NEW_TOPIC["concurrency"], 0, MAX_CONCURRENCY,
                              "3 for three callbacks at once, 0 for no limit"),
        paused=f.boolean("paused", NEW_TOPIC["paused"]),
        breaker_threshold=f.integer("breaker_threshold", NEW_TOPIC["breaker_threshold"], 0, 1000,
                                    "5 to stop calling after 5 failures in a row, 0 for none"),
        breaker_cooloff=f.integer("breaker_cooloff", NEW_TOPIC["breaker_cooloff"], 1, 86400,
                                  "60 for a probe a minute after it opened"),
    )


def mask_url(url: str) -> str:
    """A shard URL fit to show: any password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{MASK}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", rf"\1\2{MASK}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def validate_shard(data: Mapping[str, Any], *, keep_url: str = "") -> tuple[str, str]:
    """(name, url) of a shard to save, or Invalid. A URL equal to the masked form of
    `keep_url` means "unchanged"."""
    f = Fields(data)
    errors = _unknown(data, ("name", "url"))
    name = f.text("name", limit=200)
    url = f.text("url", limit=2048)
    if not name:
        f.fail("name", "name is required, e.g. redis-2")
    if keep_url and url == mask_url(keep_url):
        url = keep_url
    if not url:
        f.fail("url", "url is required, e.g. redis://10.0.0.5:6379/0")
    else:
        try:
            normalised = normalise_redis_url(url)
            scheme, _, rest = normalised.partition("://")
            if clusterurl.is_cluster_url(normalised):
                clusterurl.parse_url(normalised)
                usable = True
            elif shardurl.kind_of(normalised) == shardurl.SENTINEL:
                shardurl.parse(normalised)
                usable = True
            else:
                usable = (rest.startswith("/") if scheme == "unix" else
                          scheme in ("redis", "rediss") and bool(urlsplit(normalised).hostname))
        except ValueError:
            usable = False
        if not usable or re.search(r"\s", url):
            f.fail("url", "url must be redis://host:port/db, rediss://..., unix:///path, "
                   "redis+sentinel://host:port[,host:port...]/service_name[/db], "
                   "redis+cluster://host:port[,host:port...] (or the original's "
                   "host:port[:password])")
    errors.update(f.errors)
    if errors:
        raise Invalid(errors)
    return name, url


ALERT_FIELDS: Final = ("host", "port", "user", "password", "tls", "sender", "redis_emails")


def alert_json(conf: AlertConf) -> dict[str, Any]:
    return {"host": conf.host, "port": conf.port, "user": conf.user, "password": None,
            "password_set": bool(conf.password), "tls": conf.tls or "none",
            "sender": conf.sender, "redis_emails": list(conf.redis_emails)}


def validate_alert(data: Mapping[str, Any], current: AlertConf) -> AlertConf:
    """New alert settings, or Invalid. Missing fields and an empty password keep the
    stored values (`clear_password` empties it)."""
    f = Fields(data)
    errors = _unknown({k: v for k, v in data.items() if k != "clear_password"},
                      (*ALERT_FIELDS, "password_set"))
    host = f.text("host", current.host)
    if host and not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", host):
        f.fail("host", "host must be a host name or IP address, e.g. smtp.example.com")
    tls = f.choice("tls", current.tls or "none", ("none", "starttls", "ssl"))
    sender = f.text("sender", current.sender)
    if sender and not EMAIL.fullmatch(sender):
        f.fail("sender", "sender must be an email address, e.g. dq@example.com")
    port = f.integer("port", current.port, 0, 65535, "587 (0 picks the default)")
    user = f.text("user", current.user)
    password = f.text("password", "")
    # An empty password keeps the stored one, but only for the same server and user: sent
    # to another server (whose "test mail" would then receive it), it must be typed again.
    if not password and not f.flag("clear_password") \
            and (host, port, user) == (current.host, current.port, current.user):
        password = current.password
    conf = AlertConf(
        host=host, port=port, user=user, password=password,
        tls="" if tls == "none" else tls, sender=sender,
        redis_emails=f.emails("redis_emails", current.redis_emails), ext=current.ext)
    errors.update(f.errors)
    if errors:
        raise Invalid(errors)
    return conf
