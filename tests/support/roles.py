"""Timers and consumers as tasks of the test's loop, and an SMTP mailbox: what the delivery
tests (test_delivery, test_flow, test_flow_retry, test_adopt) share."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dq.config import Settings
from dq.roles import consumer, timer
from dq.runtime.context import Context


class Roles:
    """Timers and consumers running as tasks of this loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[tuple[Context, asyncio.Task[None]]] = []

    def start(self, role: str, index: int = 0, **changes: Any) -> tuple[Context,
                                                                        asyncio.Task[None]]:
        ctx = Context(self.settings.replace(**changes), role, index)
        fn = timer.run if role == "timer" else consumer.run
        task = asyncio.create_task(fn(ctx), name=ctx.name)
        self.running.append((ctx, task))
        return ctx, task

    def kill(self, task: asyncio.Task[None]) -> None:
        """Like kill -9: no drain, no final writes."""
        task.cancel()

    async def stop(self) -> None:
        for ctx, _ in self.running:
            ctx.stopping.set()
        tasks = [t for _, t in self.running]
        async with asyncio.timeout(15):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                raise r


class Mailbox:
    """An aiosmtpd handler that keeps every mail: (recipients, text), and the envelope."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], str]] = []
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.messages.append((list(envelope.rcpt_tos), envelope.content.decode("utf-8", "replace")))
        return "250 OK"

    def subjects(self) -> list[str]:
        return [next((line for line in text.splitlines() if line.startswith("Subject:")), "")
                for _, text in self.messages]

    async def wait_subject(self, part: str, timeout: float) -> float:
        """Seconds until a mail whose subject contains `part` arrived."""
        t0 = time.monotonic()
        while not any(part in s for s in self.subjects()):
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"no mail with {part!r} within {timeout}s: "
                                     f"{self.subjects()}")
            await asyncio.sleep(0.05)
        return time.monotonic() - t0
