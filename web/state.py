"""What every web route shares: settings, registry, store, templates and session keys.

Registry calls are synchronous SQL; routes run them in a worker thread through `db()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.templating import Jinja2Templates

from dq.config import Settings
from dq.registry.core import Registry
from dq.roles.netpolicy import CallbackPolicy
from dq.storage.store import Store
from web.auth import Keys
from web.throttle import LoginGuard

R = TypeVar("R")


@dataclass
class WebState:
    """One console instance: its settings, the registry and store it uses, and counters."""

    settings: Settings
    registry: Registry
    store: Store
    templates: Jinja2Templates
    keys: Keys
    own_store: bool = False
    own_registry: bool = False
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "errors": 0})
    callback_policy: CallbackPolicy | None = None  # built when a callback is first checked
    guard: LoginGuard = field(default_factory=LoginGuard)  # wrong passwords, per process


def state(request: Request) -> WebState:
    st: WebState = request.app.state.dq
    return st


async def db(fn: Callable[..., R], *args: Any) -> R:
    """Run a registry call off the event loop."""
    return await asyncio.to_thread(fn, *args)
