"""A real, minimal HTTP/1.1 callback receiver for delivery tests and benchmarks.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) for httpx, records every
request with its arrival time, and answers through a per-path handler that may be async
(to hang, or to fail on a schedule).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote


@dataclass
class Request:
    method: str
    path: str
    query: bytes  # the raw query string as it came on the request line
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float = field(default_factory=time.time)

    @property
    def job_id(self) -> str:
        """The job's id: X-Dq-Id decoded (dq percent-encodes every byte but A-Z a-z 0-9
        - . _ ~ of its UTF-8, so this is the id exactly)."""
        return unquote(self.headers.get("x-dq-id", ""), errors="strict")

    @property
    def attempt(self) -> int:
        return int(self.headers.get("x-dq-attempt", "0"))

    def fields(self) -> dict[str, str]:
        """Form fields of a POST body, or query fields of a GET (single values)."""
        raw = self.query if self.method == "GET" else self.body
        return {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}

    def json(self) -> Any:
        return json.loads(self.body)


# (status, body), or (status, body, extra reply headers)
Reply = tuple[int, bytes] | tuple[int, bytes, dict[str, str]]
Handler = Callable[[Request], "Reply | Awaitable[Reply]"]


def ok(_req: Request) -> Reply:
    return 200, b'{"code":0}'


class Receiver:
    """An HTTP server on a free loopback port; `routes` maps a path to its handler."""

    def __init__(self, default: Handler = ok) -> None:
        self.default = default
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def calls(self, job_id: str | None = None, path: str | None = None) -> list[Request]:
        return [r for r in self.requests
                if (job_id is None or r.job_id == job_id) and (path is None or r.path == path)]

    async def wait_calls(self, n: int, *, job_id: str | None = None, path: str | None = None,
                         timeout: float = 10.0) -> list[Request]:
        """Wait until at least n matching requests arrived; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while len(got := self.calls(job_id, path)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(got)} of {n} calls arrived "
                                     f"(job {job_id}, path {path}) within {timeout}s")
            await asyncio.sleep(0.01)
        return got

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                req = await self._read(reader)
                if req is None:
                    break
                self.requests.append(req)
                reply = await self._answer(req)
                status, body = reply[0], reply[1]
                extra = "".join(f"{k}: {v}\r\n" for k, v in (reply[2:] or ({},))[0].items())
                writer.write(b"HTTP/1.1 %d R\r\nContent-Type: application/json\r\n%s"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (status, extra.encode("latin-1"), len(body), body))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        line, *rest = head.decode("latin-1").split("\r\n")
        method, target, _version = line.split(" ", 2)
        headers = {}
        for h in rest:
            if h:
                name, _, value = h.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        path, _, query = target.partition("?")
        return Request(method, path, query.encode("latin-1"), headers, body)

    async def _answer(self, req: Request) -> Reply:
        handler = self.routes.get(req.path, self.default)
        res = handler(req)
        if inspect.isawaitable(res):
            res = await res
        return res
