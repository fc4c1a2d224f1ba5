"""Python clients for the dq wire protocol: DqClient (blocking) and AsyncDqClient.

Both take a list of "host:port" servers, like the original PHP client: a server that
cannot be reached is skipped for a while and the request goes to another one. Failures
the server reports raise DqError with its `err` word; `get` of a missing job returns None
and `delete` of a missing job returns False.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dq.errors import NOT_FOUND, UNAVAILABLE, DqError
from dq.protocol import decode_reply, encode_frame

DEAD_FOR = 5.0  # seconds a server that failed is skipped


def _parse_server(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server {server!r} must be 'host:port', e.g. '127.0.0.1:6789'")
    return host.strip("[]"), int(port)


def add_frame(topic: str, job_id: str | int, body: Mapping[str, Any] | None, *,
              delay: float | None = None, fix_time: str | None = None,
              due_ms: int | None = None) -> bytes:
    req: dict[str, Any] = {"cmd": "add", "topic": topic, "id": job_id, "body": dict(body or {})}
    if delay is not None:
        req["delay"] = delay
    if fix_time is not None:
        req["fix_time"] = fix_time
    if due_ms is not None:
        req["due_ms"] = due_ms
    return encode_frame(req)


def _cmd_frame(cmd: str, topic: str, job_id: str | int) -> bytes:
    return encode_frame({"cmd": cmd, "topic": topic, "id": job_id})


def _decode(raw: bytes) -> Any:
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise DqError(UNAVAILABLE, "the server sent a reply that is not a JSON object")
    return decode_reply(obj)


class _Servers:
    """The server list with the ones that failed recently set aside."""

    def __init__(self, servers: Sequence[str] | str) -> None:
        if isinstance(servers, str):
            servers = [servers]
        self.servers = [_parse_server(s) for s in servers]
        if not self.servers:
            raise ValueError("DqClient needs at least one 'host:port' server")
        self.dead_until: dict[tuple[str, int], float] = {}

    def candidates(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        alive = [s for s in self.servers if self.dead_until.get(s, 0) <= now]
        random.shuffle(alive)
        dead = [s for s in self.servers if s not in alive]
        return alive + dead  # dead ones last: better a retry than no try

    def failed(self, server: tuple[str, int]) -> None:
        self.dead_until[server] = time.monotonic() + DEAD_FOR


def _unreachable(errors: list[str]) -> DqError:
    return DqError(UNAVAILABLE, "no dq server could be reached: " + "; ".join(errors))


class DqClient:
    """Blocking client. One connection at a time, reconnected on failure."""

    def __init__(self, servers: Sequence[str] | str, *, timeout: float = 3.0,
                 connect_timeout: float = 1.0) -> None:
        self._servers = _Servers(servers)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._server: tuple[str, int] | None = None
        self._buf = b""

    def __enter__(self) -> DqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self._buf = None, b""

    def _read_exact(self, n: int) -> bytes:
        assert self._sock is not None
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_reply(self) -> Any:
        head = self._read_exact(4)
        if not head.isdigit():
            raise ConnectionError(f"bad reply frame header {head!r}")
        return _decode(self._read_exact(int(head)))

    def _exchange(self, frames: Sequence[bytes], tolerate: bool = False) -> list[Any]:
        """Send frames, read one reply each; on a broken connection try the next server."""
        errors = []
        candidates = self._servers.candidates()
        reused = self._sock is not None and self._server in candidates
        if reused:
            # A kept connection may have been closed by a server that drained (a reload):
            # try it, then that server again on a fresh connection, then the others.
            candidates.insert(0, self._server)  # type: ignore[arg-type]
        for i, server in enumerate(candidates):
            try:
                if self._sock is None or self._server != server:
                    self.close()
                    self._sock = socket.create_connection(server, self.connect_timeout)
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._sock.settimeout(self.timeout)
                    self._server = server
                self._sock.sendall(b"".join(frames))
                out: list[Any] = []
                for _ in frames:
                    try:
                        out.append(self._read_reply())
                    except DqError as exc:
                        if not tolerate:
                            # keep the stream in step: read the rest before raising
                            for _ in range(len(frames) - len(out) - 1):
                                self._read_reply_safe()
                            raise
                        out.append(exc)
                return out
            except (OSError, ConnectionError, ValueError) as exc:
                errors.append(f"{server[0]}:{server[1]}: {exc}")
                if not (reused and i == 0):
                    self._servers.failed(server)
                self.close()
        raise _unreachable(errors)

    def _read_reply_safe(self) -> None:
        try:
            self._read_reply()
        except DqError:
            pass

    def add(self, topic: str, job_id: str | int, body: Mapping[str, Any] | None = None, *,
            delay: float | None = None, fix_time: str | None = None,
            due_ms: int | None = None) -> None:
        """Add or replace a job; due at fix_time, after delay seconds, at due_ms, or after
        the topic's delay."""
        self._exchange([add_frame(topic, job_id, body, delay=delay, fix_time=fix_time,
                                  due_ms=due_ms)])

    def add_many(self, jobs: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> list[Any]:
        """Pipelined adds. Each job is a dict of add()'s arguments (topic, id, body, ...).
        Returns, per job, None on success or the DqError it got."""
        results: list[Any] = []
        frames = [add_frame(j["topic"], j["id"], j.get("body"), delay=j.get("delay"),
                            fix_time=j.get("fix_time"), due_ms=j.get("due_ms")) for j in jobs]
        for i in range(0, len(frames), chunk):
            results.extend(self._exchange(frames[i:i + chunk], tolerate=True))
        return [r if isinstance(r, DqError) else None for r in results]

    def get(self, topic: str, job_id: str | int) -> dict[str, Any] | None:
        try:
            data = self._exchange([_cmd_frame("get", topic, job_id)])[0]
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return None
            raise
        return data if isinstance(data, dict) else {}

    def delete(self, topic: str, job_id: str | int) -> bool:
        try:
            self._exchange([_cmd_frame("del", topic, job_id)])
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return False
            raise
        return True

    def ping(self) -> bool:
        self._exchange([encode_frame({"cmd": "ping"})])
        return True


class AsyncDqClient:
    """asyncio client. Requests are pipelined on one connection and answered in order."""

    def __init__(self, servers: Sequence[str] | str, *, timeout: float = 3.0,
                 connect_timeout: float = 1.0) -> None:
        self._servers = _Servers(servers)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._server: tuple[str, int] | None = None
        self._lock: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncDqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            try:
                await self._conn[1].wait_closed()
            except OSError:
                pass
        self._conn = None

    async def _read_reply(self, reader: asyncio.StreamReader) -> Any:
        head = await reader.readexactly(4)
        if not head.isdigit():
            raise ConnectionError(f"bad reply frame header {head!r}")
        raw = await reader.readexactly(int(head))
        try:
            return _decode(raw)
        except DqError as exc:
            return exc

    async def _exchange(self, frames: Sequence[bytes]) -> list[Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        errors = []
        async with self._lock:
            candidates = self._servers.candidates()
            reused = self._conn is not None and self._server in candidates
            if reused:  # see DqClient._exchange
                candidates.insert(0, self._server)  # type: ignore[arg-type]
            for i, server in enumerate(candidates):
                try:
                    if self._conn is None or self._server != server:
                        await self.close()
                        self._conn = await asyncio.wait_for(
                            asyncio.open_connection(*server), self.connect_timeout)
                        self._server = server
                    reader, writer = self._conn
                    writer.write(b"".join(frames))
                    async with asyncio.timeout(self.timeout + 0.001 * len(frames)):
                        await writer.drain()
                        return [await self._read_reply(reader) for _ in frames]
                except (OSError, ConnectionError, asyncio.IncompleteReadError,
                        TimeoutError, ValueError) as exc:
                    errors.append(f"{server[0]}:{server[1]}: {exc or type(exc).__name__}")
                    if not (reused and i == 0):
                        self._servers.failed(server)
                    await self.close()
        raise _unreachable(errors)

    async def _one(self, frame: bytes) -> Any:
        res = (await self._exchange([frame]))[0]
        if isinstance(res, DqError):
            raise res
        return res

    async def add(self, topic: str, job_id: str | int, body: Mapping[str, Any] | None = None,
                  *, delay: float | None = None, fix_time: str | None = None,
                  due_ms: int | None = None) -> None:
        await self._one(add_frame(topic, job_id, body, delay=delay, fix_time=fix_time,
                                  due_ms=due_ms))

    async def add_many(self, jobs: Iterable[Mapping[str, Any]], *,
                       chunk: int = 1000) -> list[Any]:
        """Pipelined adds; per job None on success or its DqError."""
        frames = [add_frame(j["topic"], j["id"], j.get("body"), delay=j.get("delay"),
                            fix_time=j.get("fix_time"), due_ms=j.get("due_ms")) for j in jobs]
        out: list[Any] = []
        for i in range(0, len(frames), chunk):
            out.extend(await self._exchange(frames[i:i + chunk]))
        return [r if isinstance(r, DqError) else None for r in out]

    async def get(self, topic: str, job_id: str | int) -> dict[str, Any] | None:
        try:
            data = await self._one(_cmd_frame("get", topic, job_id))
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return None
            raise
        return data if isinstance(data, dict) else {}

    async def delete(self, topic: str, job_id: str | int) -> bool:
        try:
            await self._one(_cmd_frame("del", topic, job_id))
        except DqError as exc:
            if exc.err == NOT_FOUND:
                return False
            raise
        return True

    async def ping(self) -> bool:
        await self._one(encode_frame({"cmd": "ping"}))
        return True
