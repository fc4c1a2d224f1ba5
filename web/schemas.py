"""Shapes of the API's JSON, for the OpenAPI document and to filter what replies may carry.

Request bodies are validated by web.forms (field-level messages); the *In models here only
describe them in the docs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from dq.registry.values import TOPIC_HELP, Topic, topic_values


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong and what to do about it")
    err: str = Field(description="a stable word: unauthorized, forbidden, not_found, "
                     "unknown_topic, topic_offline, exists, invalid, bad_request, unavailable")
    errors: dict[str, str] = Field(default_factory=dict, description="field -> message")


_T, _H = topic_values(Topic()), TOPIC_HELP  # a new topic's defaults and what each field means


class TopicIn(BaseModel):
    """A topic to create (fields left out take these defaults) or change (fields left out
    keep their values)."""

    topic: str = Field(description=_H["topic"], examples=["order_timeout"])
    name: str = Field(_T["name"], description=_H["name"])
    delay: int = Field(_T["delay"], ge=0, description=_H["delay"])
    callback: str = Field(description=_H["callback"],
                          examples=["https://shop.example.com/hooks/order-timeout"])
    method: Literal["GET", "POST"] = Field(_T["method"], description=_H["method"])
    timeout_ms: int = Field(_T["timeout_ms"], ge=1, le=60000, description=_H["timeout_ms"])
    emails: list[str] | str = Field(default_factory=list, description=_H["emails"])
    retry_when: str = Field(_T["retry_when"], description=_H["retry_when"])
    priority: int = Field(_T["priority"], ge=1, le=3, description=_H["priority"])
    status: Literal["online", "offline"] = Field(_T["status"], description=_H["status"])
    max_attempts: int = Field(_T["max_attempts"], ge=0, le=100, description=_H["max_attempts"])
    secret: str | None = Field(None, description=_H["secret"] + "; empty or null on update "
                               "keeps the stored one")
    clear_secret: bool = Field(False, description="remove the stored secret")
    body_format: Literal["form", "json", "query"] = Field(_T["body_format"],
                                                          description=_H["body_format"])
    creator: str = Field(_T["creator"], description=_H["creator"])
    rate_limit: int = Field(_T["rate_limit"], ge=0, description=_H["rate_limit"])
    concurrency: int = Field(_T["concurrency"], ge=0, description=_H["concurrency"])
    paused: bool = Field(_T["paused"], description=_H["paused"])
    retry_policy: str = Field(_T["retry_policy"], description=_H["retry_policy"],
                              examples=["exp:30s,2,1h"])
    breaker_threshold: int = Field(_T["breaker_threshold"], ge=0, le=1000,
                                   description=_H["breaker_threshold"])
    breaker_cooloff: int = Field(_T["breaker_cooloff"], ge=1, le=86400,
                                 description=_H["breaker_cooloff"])
    headers: dict[str, str] | str = Field(default_factory=dict, description=_H["headers"],
                                          examples=[{"Authorization": "Bearer abc123"}])


class TopicOut(BaseModel):
    topic: str
    name: str
    delay: int
    callback: str
    method: str
    timeout_ms: int
    emails: list[str]
    retry_when: str
    priority: int
    status: Literal["online", "offline"]
    max_attempts: int = Field(description=_H["max_attempts"])
    secret: None = Field(None, description="never shown; see secret_set")
    secret_set: bool
    body_format: str
    creator: str
    rate_limit: int = Field(description=_H["rate_limit"])
    concurrency: int = Field(description=_H["concurrency"])
    paused: bool = Field(description=_H["paused"])
    retry_policy: str = Field(description=_H["retry_policy"])
    breaker_threshold: int = Field(description=_H["breaker_threshold"])
    breaker_cooloff: int = Field(description=_H["breaker_cooloff"])
    headers: dict[str, str] = Field(description="the topic's request headers, every value "
                                    "shown as ***")
    breaker: str | None = Field(None, description="the breaker's state when it has one: "
                                "closed or open")


class TopicList(BaseModel):
    total: int
    topics: list[TopicOut]


class ShardIn(BaseModel):
    name: str = Field(examples=["redis-2"])
    url: str = Field(examples=["redis://10.0.0.5:6379/0"])


class ShardOut(BaseModel):
    id: int | None = Field(description="registry row id; null for shards from the config")
    name: str
    url: str = Field(description="password masked")
    source: Literal["config", "embedded", "console"]
    enabled: bool
    in_use: bool = Field(description="false until workers reload after the shard was added "
                         "(dq-master reloads by itself within a few seconds)")
    up: bool
    error: str
    version: str
    memory: str
    depths: dict[str, int]


class AlertIn(BaseModel):
    host: str = Field("", examples=["smtp.example.com"])
    port: int = Field(0, ge=0, le=65535, description="0 = 25, 587 or 465 by tls")
    user: str = ""
    password: str | None = Field(None, description="empty or null keeps the stored one")
    clear_password: bool = False
    tls: Literal["none", "starttls", "ssl"] = "none"
    sender: str = ""
    redis_emails: list[str] | str = Field(default_factory=list,
                                          description="who is mailed when a shard is down")


class AlertOut(BaseModel):
    host: str
    port: int
    user: str
    password: None = Field(None, description="never shown; see password_set")
    password_set: bool
    tls: str
    sender: str
    redis_emails: list[str]


class TestMailIn(BaseModel):
    to: str = Field(examples=["ops@example.com"])


class JobIn(BaseModel):
    topic: str = Field(examples=["order_timeout"])
    id: str | int = Field(examples=["42"])
    body: dict[str, Any] = Field(default_factory=dict)
    delay: float | None = Field(None, description="seconds from now")
    fix_time: str | int | None = Field(None, description=(
        "'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD HH:MM', 'YYYY-MM-DD', 'YYYY/MM/DD HH:MM:SS', ISO 8601 "
        "with 'T' and an optional 'Z' or offset, Unix seconds, or '+N minutes' (second, "
        "minute, hour, day, week); without an offset, in the server's zone"))
    due_ms: int | None = Field(None, description="epoch milliseconds")


class AddOut(BaseModel):
    topic: str
    id: str
    replaced: bool
    due_ms: int
    due: str
    shard: str


class JobOut(BaseModel):
    topic: str
    id: str
    shard: str
    state: Literal["delayed", "ready", "inflight", "dead"]
    due_ms: int = Field(description="when the job is due: for a retrying job, its next attempt")
    due: str
    attempts: int = Field(description="failed attempts so far")
    priority: int
    body: dict[str, Any]
    error: dict[str, Any] | None = Field(description="the last failed attempt's error, of a "
                                         "dead letter or of a job waiting to retry: status "
                                         "(0: no reply), error, reply (an excerpt), attempts, "
                                         "at (epoch ms) and at_time")
    retrying: bool = Field(False, description="true while the job waits for another attempt "
                           "after failed ones")
    next_attempt: str | None = Field(None, description="when a retrying job's next attempt "
                                     "is due ('Y-m-d H:i:s'; due_ms in epoch ms)")


class DeadList(BaseModel):
    dead: list[JobOut]


class Done(BaseModel):
    ok: bool = True
    detail: str = ""


class TopicStats(BaseModel):
    topic: str
    name: str
    online: bool
    today: dict[str, int]
    total: dict[str, int]


class Minute(BaseModel):
    minute: int = Field(description="epoch minute")
    writes: int
    ok: int
    fail: int


class StatsOut(BaseModel):
    topics: list[TopicStats]
    shards: list[ShardOut]
    minutes: list[Minute]


class Health(BaseModel):
    status: Literal["ok"]
