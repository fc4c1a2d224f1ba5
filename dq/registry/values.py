"""What the registry holds, as plain frozen values: a topic, a shard, the alert settings.

Workers, the console and the docs use these; none of it knows SQL (dq/registry/models.py
maps them to php-delayqueue's tables). Building a Topic normalises it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from dq.config import Settings
from dq.registry import headers as hdr
from dq.registry.retry_policy import DEFAULT as DEFAULT_POLICY
from dq.sharding import shardurl

RETRY_PLACEHOLDER = "重试标记"  # the original's column default; it means "no expression"
OFFLINE = 2  # what the original console writes for an offline topic
# How a POST callback carries the body: form (urlencoded body, as the original sent it),
# json, or query (the fields in the query string and an empty body; dq/roles/callback.py)
BODY_FORMATS = ("form", "json", "query")
BREAKER_COOLOFF = 60  # seconds, a topic's breaker_cooloff unless set
MAX_RATE = 100_000  # a topic's rate_limit, callbacks per second
MAX_CONCURRENCY = 10_000  # a topic's concurrency


def split_list(value: str | Iterable[str]) -> tuple[str, ...]:
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
        fix("emails", split_list(self.emails))
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
