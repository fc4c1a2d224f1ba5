"""DqClient: the blocking client, over the shared core (dq.client.core)."""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from dq.client.core import (
    Request,
    _Attempts,
    _decode,
    _Servers,
    add_request,
    delete_request,
    get_request,
    ping_request,
    read_header,
)
from dq.client.many import ManyAdd, _Many
from dq.errors import DqError

T = TypeVar("T")


class DqClient:
    """Blocking client. One connection at a time, reconnected on failure."""

    def __init__(self, servers: Sequence[str] | str, *, timeout: float = 3.0,
                 connect_timeout: float = 1.0, many_frames: bool = True) -> None:
        self._servers = _Servers(servers)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._server: tuple[str, int] | None = None
        self._buf = b""
        self._many = _Many(many_frames)

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
        """The next reply's data, or the DqError it carries."""
        try:
            return _decode(self._read_exact(read_header(self._read_exact(4))))
        except DqError as exc:
            return exc

    def _connect(self, server: tuple[str, int]) -> None:
        if self._sock is None or self._server != server:
            self.close()
            self._sock = socket.create_connection(server, self.connect_timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.settimeout(self.timeout)
            self._server = server

    def _exchange(self, frames: Sequence[bytes]) -> list[Any]:
        """Send frames and read one reply each: its data, or the DqError it carries. On a
        broken connection all of them go to the next server."""
        attempts = _Attempts(self._servers, self._server if self._sock is not None else None)
        for server in attempts:
            try:
                self._connect(server)
                assert self._sock is not None
                self._sock.sendall(b"".join(frames))
                return [self._read_reply() for _ in frames]
            except (OSError, ConnectionError, ValueError) as exc:
                attempts.failed(server, str(exc))
                self.close()
        raise attempts.error()

    def _call(self, request: Request[T]) -> T:
        return request.result(self._exchange([request.frame])[0])

    def add(self, topic: str, job_id: str | int, body: Mapping[str, Any] | None = None, *,
            delay: float | None = None, fix_time: str | int | None = None,
            due_ms: int | None = None) -> None:
        """Add or replace a job; due at fix_time, after delay seconds, at due_ms, or after
        the topic's delay."""
        self._call(add_request(topic, job_id, body, delay=delay, fix_time=fix_time,
                               due_ms=due_ms))

    def add_many(self, jobs: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> list[Any]:
        """Adds sent together: many jobs to an add_many frame, frames pipelined, `chunk`
        jobs at a time. Each job is a dict of add()'s arguments (topic, id, body, ...).
        Returns, per job, None on success or the DqError it got (a job that cannot be
        encoded gets a bad_request one). dq before 0.3 refuses add_many frames and is then
        sent one add frame per job; php-delayqueue's server does not answer them: make
        clients for it with `many_frames=False`."""
        jobs = list(jobs)
        out: list[Any] = [None] * len(jobs)
        for lo in range(0, len(jobs), chunk):
            part = jobs[lo:lo + chunk]
            plan = ManyAdd(self._many, part, len(part))
            if plan.use_many:
                plan.many_replies(self._exchange([d for f in plan.many_frames() for d in f]))
            singles = plan.singles()
            out[lo:lo + len(part)] = plan.results(self._exchange(singles) if singles else [])
        return out

    def get(self, topic: str, job_id: str | int) -> dict[str, Any] | None:
        """The job (its body and times), or None when there is no such job."""
        return self._call(get_request(topic, job_id))

    def delete(self, topic: str, job_id: str | int) -> bool:
        """Delete a job; False when there was no such job."""
        return self._call(delete_request(topic, job_id))

    def ping(self) -> bool:
        return self._call(ping_request())
