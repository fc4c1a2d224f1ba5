"""The checker's first duty: ping every shard each round, keep the shared health record
(dq/sharding/health.py) and mail the shards' outages and recoveries (the rules are in the
package's doc, dq/roles/checker/__init__.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime

from dq.errors import DqError
from dq.registry.core import Registry
from dq.roles.alert import send_alert
from dq.runtime.context import Context
from dq.sharding.health import ShardHealth, health_path, read_health, safe_name, write_health
from dq.sharding.shards import Shard, ShardSet

log = logging.getLogger("dq.checker")

MAIL_EVERY = 600.0  # seconds: at most one outage mail per shard this often
PING_TIMEOUT_MAX = 1.0
_WHY = re.compile(r"is unavailable \((.*)\); retry shortly$")




async def ping(shard: Shard, timeout: float) -> str:
    """'' when the shard answers PING within `timeout`, else why not.

    Pings go straight to the connection, past the shard's circuit breaker: the checker
    must see a recovery as soon as it happens."""
    try:
        async with asyncio.timeout(timeout):
            await shard.conn.call("PING")
    except DqError as exc:
        why = _WHY.search(exc.msg)  # the reason inside "redis shard X is unavailable (...)"
        return why.group(1) if why else exc.msg
    except TimeoutError:
        shard.conn.close()  # a half-open or hung connection: reconnect next round
        return f"no answer to PING within {timeout:g} s"
    except Exception as exc:
        return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
    return ""


@dataclass
class ShardState:
    """What the checker knows and has said about one shard."""

    name: str  # password masked: the record's key and what logs and mails show
    up: bool = True
    since: float = 0.0  # epoch s of the last change
    error: str = ""
    failing_since: float | None = None  # monotonic s of the first failure in a row
    mailed_up: bool = True  # the state the last mail told (none yet: up)
    last_mail: float | None = None  # monotonic s
    outages: int = 0  # outages since the last mail
    guests: bool = False  # holds jobs whose owner is another shard

    def health(self) -> ShardHealth:
        return ShardHealth(self.up, self.since, self.error, self.guests)


class Checker:
    """Rounds of pings over every shard, the state machine per shard, and the mails."""

    def __init__(self, ctx: Context, shards: ShardSet, *, registry: Registry | None = None,
                 mail_every: float = MAIL_EVERY) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.shards = shards
        self.registry = registry
        self.mail_every = mail_every
        self.path = health_path(ctx.settings)
        self.timeout = max(0.2, min(ctx.settings.checker_interval, PING_TIMEOUT_MAX))
        self.states = {s.name: ShardState(safe_name(s.name), since=time.time())
                       for s in shards.shards}
        self.mails: set[asyncio.Task[bool]] = set()
        self.rounds = self.failures = self.changes = self.mailed = self.guests_moved = 0
        self.adopted = 0  # php-delayqueue's jobs adopted (dq/storage/adopt.py)
        self._saved = False
        self._resume()

    def _resume(self) -> None:
        """Start from the record a previous checker left, so an outage it announced is
        neither announced again nor left without its recovery mail."""
        try:
            old = read_health(self.path)
        except (OSError, ValueError) as exc:
            log.warning("%s: ignoring unreadable %s (%s)", self.ctx.name, self.path, exc)
            return
        for st in self.states.values():
            prev = old.get(st.name)
            if prev is not None and not prev.up:
                st.up = st.mailed_up = False
                st.since, st.error = prev.since, prev.error
                st.failing_since = time.monotonic()

    async def check(self) -> None:
        """One round: ping every shard, apply the verdicts, save and mail what changed."""
        shards = self.shards.shards
        errors = await asyncio.gather(*(ping(s, self.timeout) for s in shards))
        self.rounds += 1
        now = time.monotonic()
        changed = False
        for shard, error in zip(shards, errors, strict=True):
            changed = self.observe(self.states[shard.name], error, now) or changed
        if changed or not self._saved:
            self.save()
        self.mail_due(now)

    def answering(self, shard: Shard) -> bool:
        """Up, and answered the last ping."""
        st = self.states[shard.name]
        return st.up and st.failing_since is None

    def observe(self, st: ShardState, error: str, now: float) -> bool:
        """Apply one ping result; True when the shard's recorded state changed."""
        if error:
            self.failures += 1
            st.error = error
            if st.failing_since is None:
                st.failing_since = now
                log.debug("%s: redis shard %s does not answer: %s", self.ctx.name, st.name,
                          error)
            down_for = now - st.failing_since
            if st.up and down_for >= self.settings.shard_down_after:
                st.up, st.since = False, time.time()
                st.outages += 1
                self.changes += 1
                log.warning("%s: redis shard %s is DOWN: no answer for %.1f s (%s); adds go "
                            "to the other shards", self.ctx.name, st.name, down_for, error,
                            extra={"shard": st.name, "up": False, "error": error})
                return True
            return False
        st.failing_since = None
        if st.up:
            return False
        down_for = time.time() - st.since
        st.up, st.since, st.error = True, time.time(), ""
        self.changes += 1
        log.info("%s: redis shard %s is UP again after %.1f s down", self.ctx.name, st.name,
                 down_for, extra={"shard": st.name, "up": True, "down_s": round(down_for, 1)})
        return True

    def save(self) -> None:
        try:
            write_health(self.path, {st.name: st.health() for st in self.states.values()})
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.ctx.name, self.path, exc)
            return
        self._saved = True

    # mail -------------------------------------------------------------------------------
    def mail_due(self, now: float) -> None:
        """Start the mails the states call for (see the module doc for the rules). Shards
        that change state in the same round share one mail (a Redis Cluster's partitions
        on a master that died go down together: one mail, not one per partition)."""
        due: list[tuple[str, str]] = []
        for st in self.states.values():
            if st.up == st.mailed_up:
                continue
            if not st.up and st.last_mail is not None and now - st.last_mail < self.mail_every:
                continue  # an outage mail went out lately: wait
            due.append(self.mail_text(st))
            st.mailed_up, st.last_mail, st.outages = st.up, now, 0
        if not due:
            return
        subject, text = due[0]
        if len(due) > 1:
            down = sum(1 for subj, _ in due if subj.endswith("is DOWN"))
            parts = ([f"{down} DOWN"] if down else []) + \
                ([f"{len(due) - down} back UP"] if len(due) - down else [])
            subject = f"[dq] {len(due)} redis shards changed state: {', '.join(parts)}"
            text = "\n\n----\n\n".join(f"{subj}\n\n{body}" for subj, body in due)
        task = asyncio.create_task(self._send(subject, text))
        self.mails.add(task)
        task.add_done_callback(self.mails.discard)

    def mail_text(self, st: ShardState) -> tuple[str, str]:
        host = socket.gethostname()
        since = datetime.fromtimestamp(st.since).strftime("%Y-%m-%d %H:%M:%S")
        if st.up:
            subject = f"[dq] redis shard {st.name} is back UP"
            lines = [f"The redis shard {st.name} answers again since {since}.",
                     "Its jobs are being delivered again; jobs written to other shards "
                     "while it was down are moved back to it."]
        else:
            subject = f"[dq] redis shard {st.name} is DOWN"
            lines = [f"The redis shard {st.name} has not answered PING since {since} "
                     f"(for more than {self.settings.shard_down_after:g} s).",
                     f"Last error: {st.error}",
                     "",
                     "New jobs that belong to it are written to the next healthy shard; its "
                     "own jobs wait until it is back (nothing is lost if it restarts with "
                     "its data). Jobs due on the other shards are delivered as usual."]
            if st.outages > 1:
                lines.append(f"It went down {st.outages} times since the last mail.")
        lines += ["", f"Seen by {self.ctx.name} on {host}. Another mail follows when it "
                  "changes state again."]
        return subject, "\n".join(lines)

    async def _send(self, subject: str, text: str) -> bool:
        if self.registry is None:
            log.info("%s: no registry, alert not mailed: %s", self.ctx.name, subject)
            return False
        try:
            conf = await asyncio.to_thread(self.registry.alert)
        except Exception as exc:
            log.warning("%s: cannot read alert settings (%s); not mailed: %s", self.ctx.name,
                        exc, subject)
            return False
        sent = await send_alert(conf, conf.redis_emails, subject, text)
        self.mailed += int(sent)
        return sent

    async def wait_mails(self, timeout: float) -> None:
        if self.mails:
            _done, pending = await asyncio.wait(set(self.mails), timeout=timeout)
            for t in pending:
                t.cancel()
