"""Alert mail against a real SMTP server (aiosmtpd on a free port)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from dq.registry.core import AlertConf, Topic
from dq.roles.alert import dead_letter_mail, send_alert
from dq.sharding.shards import Shard
from dq.storage.store import Claimed
from tests.support.procs import free_port


class Box:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos),
                           envelope.content.decode("utf-8", "replace")))
        return "250 OK"


def _auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"dq", b"pw")
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp() -> Iterator[tuple[Box, int]]:
    box, port = Box(), free_port()
    ctl = Controller(box, hostname="127.0.0.1", port=port, authenticator=_auth,
                     auth_require_tls=False)
    ctl.start()
    yield box, port
    ctl.stop()


async def test_sends_with_login(smtp: tuple[Box, int]) -> None:
    box, port = smtp
    conf = AlertConf(host="127.0.0.1", port=port, user="dq", password="pw",
                     sender="dq@example.test")
    assert await send_alert(conf, ["a@example.test", " "], "subject ü", "body 中文")
    [(sender, rcpt, content)] = box.mails
    assert sender == "dq@example.test" and rcpt == ["a@example.test"]
    assert "body" in content


async def test_wrong_password_is_false_not_an_exception(smtp: tuple[Box, int]) -> None:
    box, port = smtp
    conf = AlertConf(host="127.0.0.1", port=port, user="dq", password="wrong")
    assert await send_alert(conf, ["a@example.test"], "s", "t") is False
    assert box.mails == []


async def test_nothing_to_do_or_unreachable_is_false() -> None:
    assert await send_alert(AlertConf(), ["a@example.test"], "s", "t") is False
    assert await send_alert(AlertConf(host="127.0.0.1", port=1), [], "s", "t") is False
    t0 = time.monotonic()
    assert await send_alert(AlertConf(host="127.0.0.1", port=free_port()), ["a@x.test"],
                            "s", "t") is False
    assert time.monotonic() - t0 < 5


def test_dead_letter_mail_names_topic_id_status_and_reply() -> None:
    topic = Topic(topic="order", name="Orders", callback="http://x/cb", method="POST")
    c = Claimed(shard=Shard("s", "redis://127.0.0.1:1/0"), tid="order:42", topic="order",
                id="42", version="ab", priority=2, attempt=2, due_ms=0, set_ms=0,
                body={"uid": 7}, claimed_ms=0)
    subject, text = dead_letter_mail(topic, c, {"status": 502, "error": "HTTP 502",
                                                "reply": "bad gateway", "attempts": 3,
                                                "at": 1_700_000_000_000})
    assert "order:42" in subject and "3 attempts" in subject
    for part in ("order", "42", "502", "bad gateway", "POST http://x/cb", '"uid": 7'):
        assert part in text
