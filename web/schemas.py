"""Shapes of the API's JSON, for the OpenAPI document and to filter what replies may carry.

Request bodies are validated by web.forms (field-level messages); the *In models here only
describe them in the docs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong and what to do about it")
    err: str = Field(description="a stable word: unauthorized, forbidden, not_found, "
                     "unknown_topic, topic_offline, exists, invalid, bad_request, unavailable")
    errors: dict[str, str] = Field(default_factory=dict, description="field -> message")


class TopicIn(BaseModel):
    topic: str = Field(description="key: 1-64 of A-Z a-z 0-9 _ . - (fixed once created)",
                       examples=["order_timeout"])
    name: str = Field("", description="what the topic is for")
    delay: int = Field(0, ge=0, description="default delay in seconds when an add gives none")
    callback: str = Field(description="http(s) URL called when a job is due",
                          examples=["https://shop.example.com/hooks/order-timeout"])
    method: Literal["GET", "POST"] = "GET"
    timeout_ms: int = Field(3000, ge=1, le=60000)
    emails: list[str] | str = Field(default_factory=list,
                                    description="who is mailed when a job dies")
    retry_when: str = Field("", description="retry a 2xx reply when true, e.g. "
                            "{res.code}!=200")
    priority: int = Field(2, ge=1, le=3, description="1 high, 2 normal, 3 low")
    status: Literal["online", "offline"] = "online"
    max_attempts: int = Field(0, ge=0, le=100, description="0 = the server's default")
    secret: str | None = Field(None, description="signs callbacks; empty or null on update "
                               "keeps the stored one")
    clear_secret: bool = Field(False, description="remove the stored secret")
    body_format: Literal["form", "json", "query"] = "form"
    creator: str = ""


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
    max_attempts: int
    secret: None = Field(None, description="never shown; see secret_set")
    secret_set: bool
    body_format: str
    creator: str


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
    due_ms: int
    due: str
    attempts: int
    priority: int
    body: dict[str, Any]
    error: dict[str, Any] | None


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
