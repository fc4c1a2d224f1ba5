"""Alert mail: tell a topic's owners that a job used up its attempts.

`send_alert` talks SMTP with the stdlib in a worker thread (STARTTLS or implicit TLS as the
registry's alert settings say, login when a user is set, 10 s timeout). It never raises: a
mail that cannot be sent is logged and reported as False, so a broken mail server never
stops delivery.
"""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import ssl
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

from dq.registry.core import AlertConf, Topic
from dq.storage.store import Claimed

log = logging.getLogger("dq.alert")

SMTP_TIMEOUT = 10.0
_DEFAULT_PORTS = {"ssl": 465, "starttls": 587, "": 25}


def _message(conf: AlertConf, to: Sequence[str], subject: str, text: str) -> EmailMessage:
    msg = EmailMessage()
    sender = conf.sender or conf.user or "dq@localhost"
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg.set_content(text)
    return msg


def _send(conf: AlertConf, to: Sequence[str], msg: EmailMessage) -> None:
    port = conf.port or _DEFAULT_PORTS.get(conf.tls, 25)
    smtp: smtplib.SMTP
    if conf.tls == "ssl":
        smtp = smtplib.SMTP_SSL(conf.host, port, timeout=SMTP_TIMEOUT,
                                context=ssl.create_default_context())
    else:
        smtp = smtplib.SMTP(conf.host, port, timeout=SMTP_TIMEOUT)
    with smtp:
        if conf.tls == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if conf.user:
            smtp.login(conf.user, conf.password)
        smtp.send_message(msg, to_addrs=list(to))


async def send_alert(conf: AlertConf, to: Sequence[str], subject: str, text: str) -> bool:
    """Mail `text` to `to`; True when the server accepted it. Never raises.

    Does nothing (False) when no SMTP host is configured or there is no recipient.
    """
    recipients = [a.strip() for a in to if a.strip()]
    if not conf.host or not recipients:
        log.info("alert not mailed (%s): %s", "no SMTP host configured" if not conf.host
                 else "no recipients", subject)
        return False
    try:
        msg = _message(conf, recipients, subject, text)
        await asyncio.to_thread(_send, conf, recipients, msg)
    except Exception as exc:
        log.warning("alert mail to %s via %s:%s failed (%s: %s): %s", ",".join(recipients),
                    conf.host, conf.port, exc.__class__.__name__, exc, subject)
        return False
    log.info("alert mailed to %s: %s", ",".join(recipients), subject)
    return True


def _fmt_ms(epoch_ms: Any) -> str:
    try:
        return datetime.fromtimestamp(int(epoch_ms) / 1000).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(epoch_ms)


def dead_letter_mail(topic: Topic, claimed: Claimed,
                     error: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, text) of the mail sent when a job becomes a dead letter."""
    attempts = error.get("attempts", claimed.attempt + 1)
    subject = f"[dq] {topic.topic}:{claimed.id} failed after {attempts} attempts"
    first = f"dq gave up delivering a job of topic {topic.topic!r} ({topic.name or topic.topic})."
    if claimed.unreadable:
        subject = f"[dq] {topic.topic}:{claimed.id} cannot be read"
        first = (f"dq could not read a stored job of topic {topic.topic!r} "
                 f"({topic.name or topic.topic}), so its callback was not called.")
    status = error.get("status", 0)
    lines = [
        first,
        "",
        f"topic:        {topic.topic}",
        f"id:           {claimed.id}",
        f"callback:     {topic.method} {topic.callback}",
        f"attempts:     {attempts}",
        f"last status:  {status if status else 'no HTTP reply'}",
        f"last error:   {error.get('error', '')}",
        f"failed at:    {_fmt_ms(error.get('at', int(time.time() * 1000)))}",
        f"due was:      {_fmt_ms(claimed.due_ms)}",
        "",
        "reply excerpt:",
        str(error.get("reply", "")) or "(empty)",
        "",
        "job body:",
        json.dumps(claimed.body, ensure_ascii=False, indent=2)[:2000],
        "",
        "The job is kept as a dead letter; redrive or delete it from the console.",
    ]
    return subject, "\n".join(lines)


def breaker_mail(topic: Topic, event: Mapping[str, Any]) -> tuple[str, str]:
    """(subject, text) of the mail sent when a topic's circuit breaker opens or closes
    (`event` as dq/storage/lua/breaker.lua records it: event open|close, at, fails, error)."""
    at = _fmt_ms(event.get("at", int(time.time() * 1000)))
    if event.get("event") == "open":
        subject = f"[dq] {topic.topic}: circuit breaker open, callbacks stopped"
        first = (f"{event.get('fails', topic.breaker_threshold)} callbacks of topic "
                 f"{topic.topic!r} ({topic.name or topic.topic}) failed in a row, so dq stopped "
                 f"calling it at {at}. Its jobs wait without using attempts; every "
                 f"{topic.breaker_cooloff} s one job is sent as a probe, and the first that "
                 "succeeds closes the breaker.")
        extra = [f"last error:   {event.get('error', '')}"]
    else:
        subject = f"[dq] {topic.topic}: circuit breaker closed, callbacks resumed"
        first = (f"A callback of topic {topic.topic!r} ({topic.name or topic.topic}) succeeded "
                 f"at {at}, so dq calls it again; the jobs that waited are delivered now.")
        extra = []
    lines = [first, "", f"topic:        {topic.topic}",
             f"callback:     {topic.method} {topic.callback}",
             f"threshold:    {topic.breaker_threshold} failures in a row",
             f"cool-off:     {topic.breaker_cooloff} s", *extra]
    return subject, "\n".join(lines)
