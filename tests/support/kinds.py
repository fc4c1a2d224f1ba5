"""Which kind a test is, told from what it reaches (its code, its fixtures' code and the test
helpers they call), so a new test is marked without anyone remembering to:

system       starts processes: a dq-master, a Redis Cluster or Sentinel set-up, a browser, or
             any other subprocess (python -m dq.cli, an example script, pytest itself)
integration  talks to real servers in this process's loop: a redis-server of its own, MariaDB,
             the callback receiver, an SMTP inbox
unit         the rest: pure code (SQLite files and loopback sockets of its own allowed)
"""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import types
from collections.abc import Iterable
from typing import Any

from aiosmtpd.controller import Controller

from tests.support.browser import Browser, LiveConsole
from tests.support.masters import Master
from tests.support.receiver import Receiver
from tests.support.rediscluster import RedisCluster
from tests.support.redisproc import RedisProcess
from tests.support.sentinels import SentinelSetup

SYSTEM: tuple[Any, ...] = (Master, RedisCluster, SentinelSetup, LiveConsole, Browser, subprocess,
                           asyncio.create_subprocess_exec)
INTEGRATION: tuple[Any, ...] = (RedisProcess, Receiver, Controller)
INTEGRATION_FIXTURES = frozenset({"redis_server", "redis_factory", "shared_redis",
                                  "mariadb_url", "receiver", "smtp"})


def _codes(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _codes(c)


def reaches(funcs: Iterable[Any], targets: tuple[Any, ...]) -> bool:
    """Whether any of `funcs`, or a function of tests/ they name, names one of `targets`
    (global names and attributes of modules, e.g. asyncio.create_subprocess_exec)."""
    return any(_names(fn, targets) for fn in reached(funcs))


def _names(fn: Any, targets: tuple[Any, ...]) -> bool:
    """Whether `fn`'s own code names one of `targets`."""
    env = getattr(fn, "__globals__", {})
    for c in _codes(fn.__code__):
        for name in c.co_names:
            obj = env.get(name, sys.modules.get(name))  # a global, or a local import
            if obj is None:
                continue
            if any(obj is t for t in targets):
                return True
            if isinstance(obj, types.ModuleType) and \
                    any(getattr(obj, n, None) is t for n in c.co_names for t in targets):
                return True
    return False


# What a test does to its redis-server that a database of a shared one would not survive
# (or the next test would see): stop, restart, pause or kill it, reach it by port (database
# 0), configure it, flush its scripts, count its commands (server-wide figures).
_OWN_REDIS = re.compile(r"redis_server\.(?!url\b)\w+|\.proc\b|config_|CONFIG|requirepass"
                        r"|maxmemory|SIGSTOP|FLUSHALL|flushall|DEBUG|script_flush|SCRIPT"
                        r"|\.info\(|commandstats|client_kill|client_pause|CLIENT")


def reached(funcs: Iterable[Any]) -> list[Any]:
    """`funcs` and every function of tests/ they name, transitively."""
    todo = [getattr(f, "__wrapped__", f) for f in funcs]
    out: list[Any] = []
    seen: set[int] = set()
    while todo:
        fn = todo.pop()
        code = getattr(fn, "__code__", None)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        out.append(fn)
        env = getattr(fn, "__globals__", {})
        for c in _codes(code):
            for name in c.co_names:
                obj = env.get(name)
                if isinstance(obj, types.FunctionType) and obj.__module__.startswith("tests"):
                    todo.append(obj)
    return out


def needs_own_redis(test: Any, fixtures: dict[str, Any]) -> bool:
    """Whether the test's redis_server must be a redis-server of its own (see _OWN_REDIS),
    not a database of its worker's shared one."""
    for fn in reached([test, *fixtures.values()]):
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            return True
        if _OWN_REDIS.search(source):
            return True
    return False


def kind(test: Any, fixtures: dict[str, Any], fixturenames: Iterable[str]) -> str:
    """'system', 'integration' or 'unit' for a test function and its fixtures' functions."""
    funcs = [test, *fixtures.values()]
    if reaches(funcs, SYSTEM):
        return "system"
    if INTEGRATION_FIXTURES & set(fixturenames) or reaches(funcs, INTEGRATION):
        return "integration"
    return "unit"
